import { Voxbridge } from '../nodes/Voxbridge/Voxbridge.node';
import { buildRequest } from './declarative';

const description = new Voxbridge().description;
const BASE = 'http://127.0.0.1:8080/v1';

describe('Voxbridge node description', () => {
	it('is usable as an AI tool and warns that the agent chooses whom to call', () => {
		expect(description.usableAsTool).toBe(true);
		expect(description.description).toMatch(/AI agent/);
		expect(description.description).toMatch(/chooses whom to call/);
		expect(description.description).toMatch(/allow\.calls/);
		expect(description.credentials).toEqual([{ name: 'voxbridgeApi', required: true }]);
	});

	it('builds the base URL from the credential, with or without a trailing slash', () => {
		for (const baseUrl of ['https://bridge.example:8443', 'https://bridge.example:8443/']) {
			const req = buildRequest(description, { resource: 'profile', operation: 'getAll' }, { baseUrl });
			expect(req.baseURL).toBe('https://bridge.example:8443/v1');
		}
	});
});

describe('Call: Start AI Call', () => {
	it('POSTs /calls with only the destination and empty variables/metadata by default', () => {
		const req = buildRequest(description, {
			resource: 'call',
			operation: 'start',
			destination: '+441632960123',
		});
		expect(req.method).toBe('POST');
		expect(req.baseURL).toBe(BASE);
		expect(req.url).toBe('/calls');
		expect(req.body).toEqual({ destination: '+441632960123', variables: {}, metadata: {} });
		expect(req.qs).toEqual({});
	});

	it('sends overrides, variables as an object and metadata as parsed JSON', () => {
		const req = buildRequest(description, {
			resource: 'call',
			operation: 'start',
			destination: '100',
			variables: {
				variable: [
					{ name: 'customer_name', value: 'Ada' },
					{ name: 'order', value: 'A17' },
					{ name: '', value: 'ignored: no name' },
				],
			},
			metadata: '{"lead_id": 42, "crm": {"source": "web"}}',
			additionalFields: {
				profile: 'sales',
				prompt: 'Call {customer_name} about order {order}.',
				firstMessage: 'Hi, this is Example Ltd.',
				voice: 'Edward',
				language: 'en-GB',
				callerId: '+441632960000',
			},
		});
		expect(req.method).toBe('POST');
		expect(req.url).toBe('/calls');
		expect(req.body).toEqual({
			destination: '100',
			variables: { customer_name: 'Ada', order: 'A17' },
			metadata: { lead_id: 42, crm: { source: 'web' } },
			profile: 'sales',
			prompt: 'Call {customer_name} about order {order}.',
			first_message: 'Hi, this is Example Ltd.',
			voice: 'Edward',
			language: 'en-GB',
			caller_id: '+441632960000',
		});
	});

	it('accepts metadata that is already an object (from an expression)', () => {
		const req = buildRequest(description, {
			resource: 'call',
			operation: 'start',
			destination: '100',
			metadata: { lead_id: 7 },
		});
		expect(req.body.metadata).toEqual({ lead_id: 7 });
	});
});

describe('Call: Get / Hang Up / Transfer / Send DTMF', () => {
	const id = '3f1c0a52-8d7e-4b7e-9a51-0f6a2c7d9e10';

	it('Get: GET /calls/{id}', () => {
		const req = buildRequest(description, { resource: 'call', operation: 'get', callId: id });
		expect(req.method).toBe('GET');
		expect(req.url).toBe(`/calls/${id}`);
		expect(req.body).toEqual({});
	});

	it('escapes the call id in the path', () => {
		const req = buildRequest(description, { resource: 'call', operation: 'get', callId: 'a/../b' });
		expect(req.url).toBe('/calls/a%2F..%2Fb');
	});

	it('Hang Up: POST /calls/{id}/hangup with no body', () => {
		const req = buildRequest(description, { resource: 'call', operation: 'hangUp', callId: id });
		expect(req.method).toBe('POST');
		expect(req.url).toBe(`/calls/${id}/hangup`);
		expect(req.body).toEqual({});
	});

	it('Transfer: POST /calls/{id}/transfer with extension and context', () => {
		const req = buildRequest(description, {
			resource: 'call',
			operation: 'transfer',
			callId: id,
			extension: '100',
			context: 'voxbridge-operators',
		});
		expect(req.method).toBe('POST');
		expect(req.url).toBe(`/calls/${id}/transfer`);
		expect(req.body).toEqual({ extension: '100', context: 'voxbridge-operators' });
	});

	it('Transfer: leaves context out when empty (the bridge default applies)', () => {
		const req = buildRequest(description, {
			resource: 'call',
			operation: 'transfer',
			callId: id,
			extension: '100',
		});
		expect(req.body).toEqual({ extension: '100' });
	});

	it('Send DTMF: POST /calls/{id}/dtmf with digits', () => {
		const req = buildRequest(description, {
			resource: 'call',
			operation: 'sendDtmf',
			callId: id,
			digits: '12#',
		});
		expect(req.method).toBe('POST');
		expect(req.url).toBe(`/calls/${id}/dtmf`);
		expect(req.body).toEqual({ digits: '12#' });
	});
});

describe('Call: Get Many', () => {
	it('GET /calls with limit, no state filter for "all", unwrapping "calls"', () => {
		const req = buildRequest(description, { resource: 'call', operation: 'getAll' });
		expect(req.method).toBe('GET');
		expect(req.url).toBe('/calls');
		expect(req.qs).toEqual({ limit: 50 });
		expect(req.maxResults).toBe(50);
		expect(req.pagination).toBeUndefined();
		expect(req.postReceive).toEqual([{ type: 'rootProperty', properties: { property: 'calls' } }]);
	});

	it('filters by state', () => {
		for (const state of ['active', 'ended']) {
			const req = buildRequest(description, { resource: 'call', operation: 'getAll', state, limit: 5 });
			expect(req.qs).toEqual({ state, limit: 5 });
		}
	});

	it('Return All pages with limit/offset over "calls"', () => {
		const req = buildRequest(description, {
			resource: 'call',
			operation: 'getAll',
			returnAll: true,
			state: 'ended',
		});
		expect(req.qs).toEqual({ state: 'ended' });
		expect(req.paginate).toBe(true);
		expect(req.pagination).toEqual({
			type: 'offset',
			properties: {
				limitParameter: 'limit',
				offsetParameter: 'offset',
				pageSize: 100,
				type: 'query',
			},
		});
	});
});

describe('Profile: Get Many', () => {
	it('GET /profiles, unwrapping "profiles"', () => {
		const req = buildRequest(description, { resource: 'profile', operation: 'getAll' });
		expect(req.method).toBe('GET');
		expect(req.url).toBe('/profiles');
		expect(req.postReceive).toEqual([{ type: 'rootProperty', properties: { property: 'profiles' } }]);
	});
});

describe('Call: mid-call control', () => {
	const id = '3f1c0a52-8d7e-4b7e-9a51-0f6a2c7d9e10';
	const call = (operation: string, params: Record<string, unknown> = {}) =>
		buildRequest(description, { resource: 'call', operation, callId: id, ...params });

	it('offers every mid-call command as an operation with an action', () => {
		const operation = description.properties.find((p) => p.name === 'operation');
		const values = (operation?.options ?? []).map((o) => (o as { value: string }).value);
		for (const op of ['addContext', 'say', 'setTools', 'mute', 'unmute', 'tag']) {
			expect(values).toContain(op);
		}
		const callId = description.properties.find((p) => p.name === 'callId');
		expect(callId?.displayOptions?.show?.operation).toEqual(
			expect.arrayContaining(['addContext', 'say', 'setTools', 'mute', 'unmute', 'tag']),
		);
	});

	it('Add Context: POST /calls/{id}/context with the text', () => {
		const req = call('addContext', { text: 'This caller is a VIP.\nOffer the priority line.' });
		expect(req.method).toBe('POST');
		expect(req.url).toBe(`/calls/${id}/context`);
		expect(req.body).toEqual({ text: 'This caller is a VIP.\nOffer the priority line.' });
	});

	it('Say: POST /calls/{id}/say with the text, and nothing else', () => {
		const req = call('say', { text: 'Your order has shipped.' });
		expect(req.method).toBe('POST');
		expect(req.url).toBe(`/calls/${id}/say`);
		expect(req.body).toEqual({ text: 'Your order has shipped.' });
	});

	it('Set Tools: PUT /calls/{id}/tools with the names as a list, blanks dropped', () => {
		const req = call('setTools', { tools: ' lookup_order, end_call ,, ' });
		expect(req.method).toBe('PUT');
		expect(req.url).toBe(`/calls/${id}/tools`);
		expect(req.body).toEqual({ tools: ['lookup_order', 'end_call'] });
		expect(call('setTools', { tools: '' }).body).toEqual({ tools: [] }); // no tools at all
		expect(call('setTools', { tools: ['a', ' b '] }).body).toEqual({ tools: ['a', 'b'] }); // from an expression
	});

	it('Mute / Unmute Caller: POST with no body', () => {
		for (const [op, path] of [
			['mute', 'mute'],
			['unmute', 'unmute'],
		]) {
			const req = call(op);
			expect(req.method).toBe('POST');
			expect(req.url).toBe(`/calls/${id}/${path}`);
			expect(req.body).toEqual({});
		}
	});

	it('Tag: POST /calls/{id}/tags with the tags as an object, unnamed ones dropped', () => {
		const req = call('tag', {
			tags: {
				tag: [
					{ name: 'tier', value: 'gold' },
					{ name: 'ticket', value: 42 },
					{ name: '', value: 'no name' },
				],
			},
		});
		expect(req.method).toBe('POST');
		expect(req.url).toBe(`/calls/${id}/tags`);
		expect(req.body).toEqual({ tags: { tier: 'gold', ticket: '42' } });
	});

	it('escapes the call id in every command path', () => {
		expect(buildRequest(description, { resource: 'call', operation: 'say', callId: 'a/../b', text: 'x' }).url).toBe(
			'/calls/a%2F..%2Fb/say',
		);
	});
});
