import type { INodeProperties } from 'n8n-workflow';

const showOnlyForCallStart = {
	operation: ['start'],
	resource: ['call'],
};

export const callStartDescription: INodeProperties[] = [
	{
		displayName: 'Destination',
		name: 'destination',
		type: 'string',
		default: '',
		required: true,
		placeholder: '+441632960123',
		description:
			'The number or extension to call. The bridge refuses (403) anything its allowlist (allow.calls) does not match.',
		displayOptions: {
			show: showOnlyForCallStart,
		},
		routing: {
			send: {
				type: 'body',
				property: 'destination',
			},
		},
	},
	{
		displayName: 'Variables',
		name: 'variables',
		placeholder: 'Add Variable',
		type: 'fixedCollection',
		typeOptions: {
			multipleValues: true,
		},
		default: {},
		description: 'Values for the {placeholders} in the profile prompt, e.g. customer_name',
		displayOptions: {
			show: showOnlyForCallStart,
		},
		options: [
			{
				displayName: 'Variable',
				name: 'variable',
				values: [
					{
						displayName: 'Name',
						name: 'name',
						type: 'string',
						default: '',
					},
					{
						displayName: 'Value',
						name: 'value',
						type: 'string',
						default: '',
					},
				],
			},
		],
		routing: {
			send: {
				type: 'body',
				property: 'variables',
				value:
					'={{ Object.fromEntries((($value || {}).variable || []).filter((v) => v.name).map((v) => [v.name, String(v.value ?? "")])) }}',
			},
		},
	},
	{
		displayName: 'Metadata (JSON)',
		name: 'metadata',
		type: 'json',
		default: '{}',
		description:
			'Any JSON object; the bridge returns it as data.metadata on every event of this call (use it to link the call to your records)',
		displayOptions: {
			show: showOnlyForCallStart,
		},
		routing: {
			send: {
				type: 'body',
				property: 'metadata',
				value: '={{ typeof $value === "string" ? JSON.parse($value || "{}") : $value }}',
			},
		},
	},
	{
		displayName: 'Additional Fields',
		name: 'additionalFields',
		type: 'collection',
		placeholder: 'Add Field',
		default: {},
		displayOptions: {
			show: showOnlyForCallStart,
		},
		options: [
			{
				displayName: 'Caller ID',
				name: 'callerId',
				type: 'string',
				default: '',
				description: 'The caller ID to present to the destination',
				routing: {
					send: {
						type: 'body',
						property: 'caller_id',
					},
				},
			},
			{
				displayName: 'First Message',
				name: 'firstMessage',
				type: 'string',
				default: '',
				description: 'What the AI says first, instead of the profile first message',
				routing: {
					send: {
						type: 'body',
						property: 'first_message',
					},
				},
			},
			{
				displayName: 'Language',
				name: 'language',
				type: 'string',
				default: '',
				placeholder: 'en-US',
				description: 'The language of the conversation, instead of the profile language',
				routing: {
					send: {
						type: 'body',
						property: 'language',
					},
				},
			},
			{
				displayName: 'Profile',
				name: 'profile',
				type: 'string',
				default: '',
				placeholder: 'receptionist',
				description: 'The AI agent profile to use (default: the bridge default_profile)',
				routing: {
					send: {
						type: 'body',
						property: 'profile',
					},
				},
			},
			{
				displayName: 'Prompt',
				name: 'prompt',
				type: 'string',
				typeOptions: {
					rows: 4,
				},
				default: '',
				description: 'Instructions for the AI on this call, instead of the profile prompt',
				routing: {
					send: {
						type: 'body',
						property: 'prompt',
					},
				},
			},
			{
				displayName: 'Voice',
				name: 'voice',
				type: 'string',
				default: '',
				description: 'The voice of the AI, instead of the profile voice',
				routing: {
					send: {
						type: 'body',
						property: 'voice',
					},
				},
			},
		],
	},
];
