import type { INodeProperties } from 'n8n-workflow';

export const callSendDtmfDescription: INodeProperties[] = [
	{
		displayName: 'Digits',
		name: 'digits',
		type: 'string',
		default: '',
		required: true,
		placeholder: '1234#',
		description: 'Keypad digits to play: 0-9, *, #, A-D',
		displayOptions: {
			show: {
				operation: ['sendDtmf'],
				resource: ['call'],
			},
		},
		routing: {
			send: {
				type: 'body',
				property: 'digits',
			},
		},
	},
];
