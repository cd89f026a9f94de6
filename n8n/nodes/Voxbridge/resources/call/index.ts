import type { INodeProperties } from 'n8n-workflow';
import { callStartDescription } from './start';
import { callIdDescription } from './callId';
import { callGetManyDescription } from './getAll';
import { callTransferDescription } from './transfer';
import { callSendDtmfDescription } from './sendDtmf';
import { callMidCallDescription } from './midcall';

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
				name: 'Add Context',
				value: 'addContext',
				action: 'Add context to a live call',
				description: 'Add instructions or facts to the live AI conversation',
				routing: {
					request: {
						method: 'POST',
						url: '=/calls/{{encodeURIComponent($parameter.callId)}}/context',
					},
				},
			},
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
				name: 'Mute Caller',
				value: 'mute',
				action: 'Mute the caller towards the AI',
				description: 'Stop sending the caller audio to the AI (it hears silence) until unmuted',
				routing: {
					request: {
						method: 'POST',
						url: '=/calls/{{encodeURIComponent($parameter.callId)}}/mute',
					},
				},
			},
			{
				name: 'Say',
				value: 'say',
				action: 'Make the AI say something',
				description: 'Make the AI say a text now',
				routing: {
					request: {
						method: 'POST',
						url: '=/calls/{{encodeURIComponent($parameter.callId)}}/say',
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
				name: 'Set Tools',
				value: 'setTools',
				action: 'Set the tools of a live call',
				description: 'Change the tools the AI may call',
				routing: {
					request: {
						method: 'PUT',
						url: '=/calls/{{encodeURIComponent($parameter.callId)}}/tools',
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
				name: 'Tag',
				value: 'tag',
				action: 'Tag a call',
				description: 'Add metadata to a call: every later event carries it',
				routing: {
					request: {
						method: 'POST',
						url: '=/calls/{{encodeURIComponent($parameter.callId)}}/tags',
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
			{
				name: 'Unmute Caller',
				value: 'unmute',
				action: 'Unmute the caller towards the AI',
				description: 'Resume sending the caller audio to the AI',
				routing: {
					request: {
						method: 'POST',
						url: '=/calls/{{encodeURIComponent($parameter.callId)}}/unmute',
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
	...callMidCallDescription,
];
