import type { INodePropertyOptions } from 'n8n-workflow';

/** The event types of the bridge (README: "Control API, events and webhooks"). */
export const VOXBRIDGE_EVENTS: INodePropertyOptions[] = [
	{
		name: 'Barge-In',
		value: 'barge_in',
		description: 'The caller spoke over the AI and its speech was cut',
	},
	{
		name: 'Call Answered',
		value: 'call.answered',
		description: 'The AI is on the line',
	},
	{
		name: 'Call Ended',
		value: 'call.ended',
		description: 'End-of-call report: reason, duration, transcript, tool calls',
	},
	{
		name: 'Call Failed',
		value: 'call.failed',
		description: 'The gateway refused or failed, or an outbound call was not answered',
	},
	{
		name: 'Call Started',
		value: 'call.started',
		description: 'A call reached the bridge',
	},
	{
		name: 'DTMF',
		value: 'dtmf',
		description: 'The caller pressed a key',
	},
	{
		name: 'Hook Completed',
		value: 'hook.completed',
		description: 'A call hook ran: on_call_start or on_call_end (ok, refused, error, timeout…)',
	},
	{
		name: 'Tool Called',
		value: 'tool.called',
		description: 'The AI called a tool',
	},
	{
		name: 'Tool Completed',
		value: 'tool.completed',
		description: 'A tool call finished (ok, error, timeout…)',
	},
	{
		name: 'Transcript',
		value: 'transcript',
		description: 'A final transcript of the caller or the AI',
	},
];
