import type { INodeProperties } from 'n8n-workflow';

const showOnlyForCallTransfer = {
	operation: ['transfer'],
	resource: ['call'],
};

export const callTransferDescription: INodeProperties[] = [
	{
		displayName: 'Extension',
		name: 'extension',
		type: 'string',
		default: '',
		required: true,
		placeholder: '100',
		description: 'Where to send the caller; the bridge refuses (403) what allow.transfer does not list',
		displayOptions: {
			show: showOnlyForCallTransfer,
		},
		routing: {
			send: {
				type: 'body',
				property: 'extension',
			},
		},
	},
	{
		displayName: 'Context',
		name: 'context',
		type: 'string',
		default: '',
		placeholder: 'voxbridge-operators',
		description: 'The dialplan context of the extension (empty: the bridge default)',
		displayOptions: {
			show: showOnlyForCallTransfer,
		},
		routing: {
			send: {
				type: 'body',
				property: 'context',
				value: '={{ $value === "" ? undefined : $value }}',
			},
		},
	},
];
