import type { INodeProperties } from 'n8n-workflow';

/**
 * Mid-call control (README: "Mid-call control and the silence watchdog"). What a call can do
 * depends on its AI backend: GET the call for its `capabilities`; the bridge answers 409 naming
 * the backend and the command when it cannot.
 */
export const callMidCallDescription: INodeProperties[] = [
	{
		displayName: 'Text',
		name: 'text',
		type: 'string',
		typeOptions: {
			rows: 3,
		},
		default: '',
		required: true,
		placeholder: 'This caller is a VIP: offer the priority line.',
		description:
			'Add Context: instructions or facts the AI takes into account from its next turn. Say: the words the AI speaks now. Up to 4000 characters.',
		displayOptions: {
			show: {
				operation: ['addContext', 'say'],
				resource: ['call'],
			},
		},
		routing: {
			send: {
				type: 'body',
				property: 'text',
			},
		},
	},
	{
		displayName: 'Tool Names',
		name: 'tools',
		type: 'string',
		default: '',
		placeholder: 'lookup_order, end_call',
		description:
			'Comma-separated names of the tools the AI may call from now on (among those its profile offers); empty for none',
		displayOptions: {
			show: {
				operation: ['setTools'],
				resource: ['call'],
			},
		},
		routing: {
			send: {
				type: 'body',
				property: 'tools',
				value:
					'={{ (Array.isArray($value) ? $value : String($value ?? "").split(",")).map((t) => String(t).trim()).filter((t) => t) }}',
			},
		},
	},
	{
		displayName: 'Tags',
		name: 'tags',
		type: 'fixedCollection',
		typeOptions: {
			multipleValues: true,
		},
		default: {},
		placeholder: 'Add Tag',
		description: 'Merged into the call metadata, which every later event of the call carries',
		displayOptions: {
			show: {
				operation: ['tag'],
				resource: ['call'],
			},
		},
		options: [
			{
				displayName: 'Tag',
				name: 'tag',
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
				property: 'tags',
				value:
					'={{ Object.fromEntries((($value || {}).tag || []).filter((t) => t.name).map((t) => [t.name, String(t.value ?? "")])) }}',
			},
		},
	},
];
