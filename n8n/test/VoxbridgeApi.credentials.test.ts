import { VoxbridgeApi } from '../credentials/VoxbridgeApi.credentials';
import { resolve } from './declarative';

describe('VoxbridgeApi credential', () => {
	const cred = new VoxbridgeApi();

	it('has a base URL defaulting to the bridge default and a password token field', () => {
		const baseUrl = cred.properties.find((p) => p.name === 'baseUrl');
		const token = cred.properties.find((p) => p.name === 'apiToken');
		expect(baseUrl?.default).toBe('http://127.0.0.1:8080');
		expect(token?.typeOptions?.password).toBe(true);
		expect(cred.name).toBe('voxbridgeApi');
	});

	it('authenticates with Authorization: Bearer <token>', () => {
		expect(cred.authenticate.type).toBe('generic');
		const header = cred.authenticate.properties.headers?.Authorization;
		const $credentials = { baseUrl: 'http://127.0.0.1:8080', apiToken: 's3cret-token' };
		expect(resolve(header, { $parameter: {}, $credentials })).toBe('Bearer s3cret-token');
	});

	it('tests the token with GET /v1/auth against the configured base URL', () => {
		expect(cred.test.request.method).toBe('GET');
		expect(cred.test.request.url).toBe('/v1/auth');
		for (const baseUrl of ['http://10.0.0.5:8080', 'http://10.0.0.5:8080//']) {
			expect(resolve(cred.test.request.baseURL, { $parameter: {}, $credentials: { baseUrl } })).toBe(
				'http://10.0.0.5:8080',
			);
		}
	});
});
