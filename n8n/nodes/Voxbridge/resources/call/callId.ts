import type { INodeProperties } from 'n8n-workflow';

export const callIdDescription: INodeProperties[] = [
	{
		displayName: 'Call ID',
		name: 'callId',
		type: 'string',
		default: '',
		required: true,
		placeholder: '3f1c0a52-8d7e-4b7e-9a51-0f6a2c7d9e10',
		description: 'The call_id the bridge returned when the call started (the AudioSocket UUID)',
		displayOptions: {
			show: {
				resource: ['call'],
				operation: [
					'get',
					'hangUp',
					'transfer',
					'sendDtmf',
					'addContext',
					'say',
					'setTools',
					'mute',
					'unmute',
					'tag',
				],
			},
		},
	},
];
