import type {
	IAuthenticateGeneric,
	Icon,
	ICredentialTestRequest,
	ICredentialType,
	INodeProperties,
} from 'n8n-workflow';

export class VoxbridgeApi implements ICredentialType {
	name = 'voxbridgeApi';

	displayName = 'Voxbridge API';

	icon: Icon = { light: 'file:../icons/voxbridge.svg', dark: 'file:../icons/voxbridge.dark.svg' };

	documentationUrl = 'https://github.com/voxbridge/voxbridge#control-api-events-and-webhooks';

	properties: INodeProperties[] = [
		{
			displayName: 'Base URL',
			name: 'baseUrl',
			type: 'string',
			default: 'http://127.0.0.1:8080',
			placeholder: 'http://127.0.0.1:8080',
			description:
				'Where the voxbridge control API listens (its api.listen setting), without a trailing /v1',
			required: true,
		},
		{
			displayName: 'API Token',
			name: 'apiToken',
			type: 'string',
			typeOptions: { password: true },
			default: '',
			description: "The bridge's API token (VOXBRIDGE_API_TOKEN), sent as a Bearer token",
			required: true,
		},
	];

	authenticate: IAuthenticateGeneric = {
		type: 'generic',
		properties: {
			headers: {
				Authorization: '=Bearer {{$credentials.apiToken}}',
			},
		},
	};

	test: ICredentialTestRequest = {
		request: {
			baseURL: '={{$credentials.baseUrl.replace(/\\/+$/, "")}}',
			url: '/v1/auth',
			method: 'GET',
		},
	};
}
