import { NodeConnectionTypes, type INodeType, type INodeTypeDescription } from 'n8n-workflow';
import { callDescription } from './resources/call';
import { profileDescription } from './resources/profile';

export class Voxbridge implements INodeType {
	description: INodeTypeDescription = {
		displayName: 'Voxbridge',
		name: 'voxbridge',
		icon: { light: 'file:../../icons/voxbridge.svg', dark: 'file:../../icons/voxbridge.dark.svg' },
		group: ['transform'],
		version: 1,
		subtitle: '={{$parameter["operation"] + ": " + $parameter["resource"]}}',
		description:
			'Start and control AI phone calls through voxbridge (Asterisk to AI voice agents). Warning: when an AI agent uses this node as a tool, the agent chooses whom to call; the bridge allowlist (allow.calls) is the safeguard, so keep it as narrow as possible.',
		defaults: {
			name: 'Voxbridge',
		},
		usableAsTool: true,
		inputs: [NodeConnectionTypes.Main],
		outputs: [NodeConnectionTypes.Main],
		credentials: [
			{
				name: 'voxbridgeApi',
				required: true,
			},
		],
		requestDefaults: {
			baseURL: '={{$credentials.baseUrl.replace(/\\/+$/, "")}}/v1',
			headers: {
				Accept: 'application/json',
				'Content-Type': 'application/json',
			},
		},
		properties: [
			{
				displayName:
					'When an AI agent uses this node as a tool, the agent decides whom to call. The bridge only dials destinations its allowlist (allow.calls) permits: keep that list narrow.',
				name: 'agentNotice',
				type: 'notice',
				default: '',
			},
			{
				displayName: 'Resource',
				name: 'resource',
				type: 'options',
				noDataExpression: true,
				options: [
					{
						name: 'Call',
						value: 'call',
					},
					{
						name: 'Profile',
						value: 'profile',
					},
				],
				default: 'call',
			},
			...callDescription,
			...profileDescription,
		],
	};
}
