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
		name: 'Call Muted',
		value: 'call.muted',
		description: 'The caller was muted towards the AI (mid-call command)',
	},
	{
		name: 'Call Started',
		value: 'call.started',
		description: 'A call reached the bridge',
	},
	{
		name: 'Call Tagged',
		value: 'call.tagged',
		description: 'Tags were added to the call metadata (mid-call command)',
	},
	{
		name: 'Call Unmuted',
		value: 'call.unmuted',
		description: 'The caller was unmuted towards the AI (mid-call command)',
	},
	{
		name: 'Context Added',
		value: 'call.context',
		description: 'Context or instructions were added to the live conversation (mid-call command)',
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
		name: 'Said',
		value: 'call.say',
		description: 'The AI was made to say a text (mid-call command)',
	},
	{
		name: 'Silence Detected',
		value: 'silence.detected',
		description: 'The caller was silent too long: the bridge checked in (prompt or WAV)',
	},
	{
		name: 'Silence Hang-Up',
		value: 'silence.hangup',
		description: 'The caller stayed silent after the check-in: the call is ended',
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
		name: 'Tools Changed',
		value: 'call.tools',
		description: 'The tools the AI may call were changed (mid-call command)',
	},
	{
		name: 'Transcript',
		value: 'transcript',
		description: 'A final transcript of the caller or the AI',
	},
];
