import type { INodeProperties } from 'n8n-workflow';

const showOnlyForCallGetMany = {
	operation: ['getAll'],
	resource: ['call'],
};

export const callGetManyDescription: INodeProperties[] = [
	{
		displayName: 'State',
		name: 'state',
		type: 'options',
		default: 'all',
		description: 'Which calls to list',
		displayOptions: {
			show: showOnlyForCallGetMany,
		},
		options: [
			{
				name: 'All',
				value: 'all',
				description: 'Live calls and history',
			},
			{
				name: 'Active',
				value: 'active',
				description: 'Calls in progress',
			},
			{
				name: 'Ended',
				value: 'ended',
				description: 'Finished calls, from history',
			},
		],
		routing: {
			send: {
				type: 'query',
				property: 'state',
				value: '={{ $value === "all" ? undefined : $value }}',
			},
		},
	},
	{
		displayName: 'Return All',
		name: 'returnAll',
		type: 'boolean',
		default: false,
		description: 'Whether to return all results or only up to a given limit',
		displayOptions: {
			show: showOnlyForCallGetMany,
		},
		routing: {
			send: {
				paginate: '={{ $value }}',
			},
			operations: {
				// Pages of `limit`/`offset` until a short page. No rootProperty here: the operation's
				// postReceive already unwraps "calls" from each page.
				pagination: {
					type: 'offset',
					properties: {
						limitParameter: 'limit',
						offsetParameter: 'offset',
						pageSize: 100,
						type: 'query',
					},
				},
			},
		},
	},
	{
		displayName: 'Limit',
		name: 'limit',
		type: 'number',
		default: 50,
		typeOptions: {
			minValue: 1,
			maxValue: 500,
		},
		description: 'Max number of results to return',
		displayOptions: {
			show: {
				...showOnlyForCallGetMany,
				returnAll: [false],
			},
		},
		routing: {
			send: {
				type: 'query',
				property: 'limit',
			},
			output: {
				maxResults: '={{$value}}',
			},
		},
	},
];
