import type { INodeProperties } from 'n8n-workflow';
import { callStartDescription } from './start';
import { callIdDescription } from './callId';
import { callGetManyDescription } from './getAll';
import { callTransferDescription } from './transfer';
import { callSendDtmfDescription } from './sendDtmf';

const showOnlyForCalls = {
	resource: ['call'],
};

export const callDescription: INodeProperties[] = [
	{
		displayName: 'Operation',
		name: 'operation',
		type: 'options',
		noDataExpression: true,
		displayOptions: {
			show: showOnlyForCalls,
		},
		options: [
			{
				name: 'Get',
				value: 'get',
				action: 'Get a call',
				description: 'Get a live or ended call, with its transcript and tool calls',
				routing: {
					request: {
						method: 'GET',
						url: '=/calls/{{encodeURIComponent($parameter.callId)}}',
					},
				},
			},
			{
				name: 'Get Many',
				value: 'getAll',
				action: 'Get many calls',
				description: 'List live calls and call history, newest first',
				routing: {
					request: {
						method: 'GET',
						url: '/calls',
					},
					output: {
						postReceive: [
							{
								type: 'rootProperty',
								properties: {
									property: 'calls',
								},
							},
						],
					},
				},
			},
			{
				name: 'Hang Up',
				value: 'hangUp',
				action: 'Hang up a call',
				description: 'End a call now',
				routing: {
					request: {
						method: 'POST',
						url: '=/calls/{{encodeURIComponent($parameter.callId)}}/hangup',
					},
				},
			},
			{
				name: 'Send DTMF',
				value: 'sendDtmf',
				action: 'Send DTMF digits on a call',
				description: 'Play keypad digits on a call',
				routing: {
					request: {
						method: 'POST',
						url: '=/calls/{{encodeURIComponent($parameter.callId)}}/dtmf',
					},
				},
			},
			{
				name: 'Start AI Call',
				value: 'start',
				action: 'Start an AI call',
				description:
					'Call a destination and put an AI agent on the line. The destination must match the bridge allowlist (allow.calls).',
				routing: {
					request: {
						method: 'POST',
						url: '/calls',
					},
				},
			},
			{
				name: 'Transfer',
				value: 'transfer',
				action: 'Transfer a call',
				description: 'Send the caller to an allowlisted extension',
				routing: {
					request: {
						method: 'POST',
						url: '=/calls/{{encodeURIComponent($parameter.callId)}}/transfer',
					},
				},
			},
		],
		default: 'start',
	},
	...callStartDescription,
	...callIdDescription,
	...callGetManyDescription,
	...callTransferDescription,
	...callSendDtmfDescription,
];
