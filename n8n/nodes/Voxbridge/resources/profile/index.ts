import type { INodeProperties } from 'n8n-workflow';

const showOnlyForProfiles = {
	resource: ['profile'],
};

export const profileDescription: INodeProperties[] = [
	{
		displayName: 'Operation',
		name: 'operation',
		type: 'options',
		noDataExpression: true,
		displayOptions: {
			show: showOnlyForProfiles,
		},
		options: [
			{
				name: 'Get Many',
				value: 'getAll',
				action: 'Get many profiles',
				description: 'List the AI agent profiles the bridge is configured with',
				routing: {
					request: {
						method: 'GET',
						url: '/profiles',
					},
					output: {
						postReceive: [
							{
								type: 'rootProperty',
								properties: {
									property: 'profiles',
								},
							},
						],
					},
				},
			},
		],
		default: 'getAll',
	},
];
