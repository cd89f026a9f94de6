import { createHmac } from 'crypto';
import type { IDataObject, IHookFunctions, IHttpRequestOptions, IWebhookFunctions } from 'n8n-workflow';
import { SEEN_EVENT_IDS, firstDelivery, forgetDeliveries } from '../nodes/VoxbridgeTrigger/dedupe';
import { VoxbridgeTrigger } from '../nodes/VoxbridgeTrigger/VoxbridgeTrigger.node';

const WEBHOOK_URL = 'http://127.0.0.1:5678/webhook/0d9f6a8e-1c1b-4a57-9a3c-0c2f4b1d7e21/webhook';
const CREDENTIALS = { baseUrl: 'http://127.0.0.1:8080/', apiToken: 'tok' };

interface StoredWebhook {
	id: string;
	url: string;
	events: string[];
	secret?: string;
	description?: string;
}

/** A fake bridge webhook API behind a mocked httpRequestWithAuthentication. */
function fakeBridge() {
	const webhooks: StoredWebhook[] = [];
	let next = 1;
	const requests: IHttpRequestOptions[] = [];
	const request = jest.fn(async function (
		this: unknown,
		credentialsType: string,
		options: IHttpRequestOptions,
	): Promise<unknown> {
		expect(credentialsType).toBe('voxbridgeApi');
		requests.push(options);
		const url = options.url;
		if (options.method === 'GET' && url === 'http://127.0.0.1:8080/v1/webhooks') {
			return {
				webhooks: webhooks.map(({ id, url: u, events, description }) => ({ id, url: u, events, description })),
			};
		}
		if (options.method === 'POST' && url === 'http://127.0.0.1:8080/v1/webhooks') {
			const body = options.body as IDataObject;
			const hook: StoredWebhook = {
				id: `wh_${next++}`,
				url: body.url as string,
				events: (body.events as string[]) ?? [],
				secret: body.secret as string,
				description: body.description as string,
			};
			webhooks.push(hook);
			return { ...hook, created_at: '2026-01-01T00:00:00Z' };
		}
		const del = /^http:\/\/127\.0\.0\.1:8080\/v1\/webhooks\/(.+)$/.exec(url);
		if (options.method === 'DELETE' && del) {
			const i = webhooks.findIndex((w) => w.id === decodeURIComponent(del[1]));
			if (i < 0) {
				throw Object.assign(new Error('Not Found'), { httpCode: '404' });
			}
			webhooks.splice(i, 1);
			return undefined;
		}
		throw Object.assign(new Error(`unexpected ${options.method} ${url}`), { httpCode: '500' });
	});
	return { webhooks, requests, request };
}

function hookContext(
	bridge: ReturnType<typeof fakeBridge>,
	staticData: IDataObject,
	events: string[] = ['call.ended'],
): IHookFunctions {
	return {
		getNodeWebhookUrl: jest.fn(() => WEBHOOK_URL),
		getNodeParameter: jest.fn((name: string, fallback?: unknown) => (name === 'events' ? events : fallback)),
		getWorkflowStaticData: jest.fn(() => staticData),
		getCredentials: jest.fn(async () => CREDENTIALS),
		getNode: jest.fn(() => ({ name: 'Voxbridge Trigger', type: 'n8n-nodes-voxbridge.voxbridgeTrigger' })),
		getWorkflow: jest.fn(() => ({ id: 'wf1', name: 'Store transcript', active: true })),
		helpers: { httpRequestWithAuthentication: bridge.request },
	} as unknown as IHookFunctions;
}

const methods = new VoxbridgeTrigger().webhookMethods.default;

describe('Voxbridge Trigger description', () => {
	it('is a webhook trigger, not an AI tool', () => {
		const d = new VoxbridgeTrigger().description;
		expect(d.group).toEqual(['trigger']);
		expect(d.usableAsTool).toBeUndefined();
		expect(d.inputs).toEqual([]);
		expect(d.webhooks).toEqual([
			{ name: 'default', httpMethod: 'POST', responseMode: 'onReceived', path: 'webhook' },
		]);
		const events = d.properties.find((p) => p.name === 'events');
		expect(events?.type).toBe('multiOptions');
		expect((events?.options ?? []).map((o) => (o as { value: string }).value).sort()).toEqual(
			[
				'barge_in',
				'call.answered',
				'call.ended',
				'call.failed',
				'call.started',
				'dtmf',
				'hook.completed',
				'tool.called',
				'tool.completed',
				'transcript',
				'call.context',
				'call.say',
				'call.tools',
				'call.muted',
				'call.unmuted',
				'call.tagged',
				'silence.detected',
				'silence.hangup',
			].sort(),
		);
	});
});

describe('Voxbridge Trigger lifecycle', () => {
	it('create registers the webhook URL, the events and a random secret, and remembers them', async () => {
		const bridge = fakeBridge();
		const staticData: IDataObject = {};
		const ctx = hookContext(bridge, staticData, ['call.ended', 'call.failed']);
		await expect(methods.create.call(ctx)).resolves.toBe(true);

		expect(bridge.requests).toHaveLength(1);
		const req = bridge.requests[0];
		expect(req.method).toBe('POST');
		expect(req.url).toBe('http://127.0.0.1:8080/v1/webhooks');
		expect(req.json).toBe(true);
		const body = req.body as IDataObject;
		expect(body.url).toBe(WEBHOOK_URL);
		expect(body.events).toEqual(['call.ended', 'call.failed']);
		expect(body.secret).toMatch(/^[0-9a-f]{64}$/);
		expect(staticData).toEqual({
			webhookId: 'wh_1',
			secret: body.secret,
			events: ['call.ended', 'call.failed'],
		});

		// A second activation gets a different secret.
		const other: IDataObject = {};
		await methods.create.call(hookContext(bridge, other));
		expect(other.secret).not.toEqual(staticData.secret);
	});

	it('checkExists finds its own subscription by URL (GET /v1/webhooks)', async () => {
		const bridge = fakeBridge();
		const staticData: IDataObject = {};
		const ctx = hookContext(bridge, staticData);
		await expect(methods.checkExists.call(ctx)).resolves.toBe(false);
		await methods.create.call(ctx);
		bridge.requests.length = 0;
		await expect(methods.checkExists.call(ctx)).resolves.toBe(true);
		expect(bridge.requests.map((r) => `${r.method} ${r.url}`)).toEqual([
			'GET http://127.0.0.1:8080/v1/webhooks',
		]);
		expect(staticData.webhookId).toBe('wh_1');
	});

	it('checkExists ignores other URLs', async () => {
		const bridge = fakeBridge();
		bridge.webhooks.push({ id: 'other', url: 'http://elsewhere/hook', events: ['call.ended'] });
		const staticData: IDataObject = {};
		await expect(methods.checkExists.call(hookContext(bridge, staticData))).resolves.toBe(false);
		expect(bridge.webhooks.map((w) => w.id)).toEqual(['other']);
	});

	it('checkExists removes a subscription for this URL whose secret was lost, so create starts clean', async () => {
		const bridge = fakeBridge();
		bridge.webhooks.push({ id: 'stale', url: WEBHOOK_URL, events: ['call.ended'] });
		const staticData: IDataObject = {};
		const ctx = hookContext(bridge, staticData);
		await expect(methods.checkExists.call(ctx)).resolves.toBe(false);
		expect(bridge.webhooks).toEqual([]);
		await methods.create.call(ctx);
		expect(bridge.webhooks.map((w) => w.url)).toEqual([WEBHOOK_URL]);
	});

	it('checkExists re-registers when the selected events changed', async () => {
		const bridge = fakeBridge();
		const staticData: IDataObject = {};
		await methods.create.call(hookContext(bridge, staticData, ['call.ended']));
		const ctx = hookContext(bridge, staticData, ['call.ended', 'transcript']);
		await expect(methods.checkExists.call(ctx)).resolves.toBe(false);
		expect(bridge.webhooks).toEqual([]);
		expect(staticData).toEqual({});
	});

	it('delete removes the subscription (DELETE /v1/webhooks/{id}) and forgets the secret', async () => {
		const bridge = fakeBridge();
		const staticData: IDataObject = {};
		const ctx = hookContext(bridge, staticData);
		await methods.create.call(ctx);
		bridge.requests.length = 0;
		await expect(methods.delete.call(ctx)).resolves.toBe(true);
		expect(bridge.requests.map((r) => `${r.method} ${r.url}`)).toEqual([
			'DELETE http://127.0.0.1:8080/v1/webhooks/wh_1',
		]);
		expect(bridge.webhooks).toEqual([]);
		expect(staticData).toEqual({});
	});

	it('delete succeeds when the bridge no longer knows the subscription (404)', async () => {
		const bridge = fakeBridge();
		const staticData: IDataObject = { webhookId: 'gone', secret: 'x', events: ['call.ended'] };
		await expect(methods.delete.call(hookContext(bridge, staticData))).resolves.toBe(true);
		expect(staticData).toEqual({});
	});

	it('delete fails loudly on other bridge errors', async () => {
		const bridge = fakeBridge();
		bridge.request.mockImplementationOnce(async () => {
			throw Object.assign(new Error('boom'), { httpCode: '500' });
		});
		const staticData: IDataObject = { webhookId: 'wh_9', secret: 'x' };
		await expect(methods.delete.call(hookContext(bridge, staticData))).rejects.toThrow();
		expect(staticData.webhookId).toBe('wh_9');
	});
});

describe('Voxbridge Trigger webhook', () => {
	const secret = 'f'.repeat(64);
	const event = {
		id: 'ev_1',
		type: 'call.ended',
		call_id: 'c1',
		ts: 1700000000.25,
		seq: 9,
		data: { reason: 'caller-hangup', transcript: [{ role: 'user', text: 'hi', t: 1.2 }], metadata: { lead: 1 } },
	};
	const raw = JSON.stringify(event);

	function sign(s: string, ts: string, body: string): string {
		return 'sha256=' + createHmac('sha256', s).update(`${ts}.${body}`).digest('hex');
	}

	function webhookContext(opts: {
		body: string;
		headers: IDataObject;
		events?: string[];
		options?: IDataObject;
		staticData?: IDataObject;
		workflowId?: string;
	}) {
		const res = { status: jest.fn().mockReturnThis(), json: jest.fn().mockReturnThis() };
		const ctx = {
			getRequestObject: jest.fn(() => ({ rawBody: Buffer.from(opts.body), body: JSON.parse(opts.body) })),
			getHeaderData: jest.fn(() => opts.headers),
			getResponseObject: jest.fn(() => res),
			getWorkflowStaticData: jest.fn(() => opts.staticData ?? { webhookId: 'wh_1', secret }),
			getWorkflow: jest.fn(() => ({ id: opts.workflowId ?? `wf_${++workflows}`, name: 'w', active: true })),
			getNode: jest.fn(() => ({ name: 'Voxbridge Trigger', type: 'n8n-nodes-voxbridge.voxbridgeTrigger' })),
			getNodeParameter: jest.fn((name: string, fallback?: unknown) => {
				if (name === 'events') return opts.events ?? ['call.ended'];
				if (name === 'options') return opts.options ?? {};
				return fallback;
			}),
			helpers: {
				returnJsonArray: (data: IDataObject) => [{ json: data }],
			},
		} as unknown as IWebhookFunctions;
		return { ctx, res };
	}

	let workflows = 0; // a workflow of its own per context unless a test says otherwise
	const nowTs = () => String(Math.floor(Date.now() / 1000));
	const trigger = new VoxbridgeTrigger();

	function signed(body: string): IDataObject {
		const ts = nowTs();
		return { 'x-voxbridge-timestamp': ts, 'x-voxbridge-signature': sign(secret, ts, body) };
	}

	it('starts the workflow once per event id: a redelivery is acknowledged and starts nothing', async () => {
		const staticData: IDataObject = { webhookId: 'wh_1', secret };
		const first = webhookContext({ body: raw, headers: signed(raw), staticData, workflowId: 'wf_dup' });
		expect((await trigger.webhook.call(first.ctx)).workflowData).toEqual([[{ json: event }]]);
		expect(staticData.seenEventIds).toEqual(['ev_1']);
		const again = webhookContext({ body: raw, headers: signed(raw), staticData, workflowId: 'wf_dup' });
		const out = await trigger.webhook.call(again.ctx);
		expect(out).toEqual({ webhookResponse: { status: 'duplicate', id: 'ev_1' } });
		expect(again.res.status).not.toHaveBeenCalled(); // 200: the bridge stops retrying
		// Another event of the same call is new.
		const other = JSON.stringify({ ...event, id: 'ev_2' });
		const next = webhookContext({ body: other, headers: signed(other), staticData, workflowId: 'wf_dup' });
		expect((await trigger.webhook.call(next.ctx)).workflowData).toHaveLength(1);
		expect(staticData.seenEventIds).toEqual(['ev_1', 'ev_2']);
	});

	it('recognises a redelivery after n8n restarted (static data) and one racing the first (process memory)', async () => {
		// After a restart: only the saved static data knows the id.
		forgetDeliveries();
		const saved: IDataObject = { webhookId: 'wh_1', secret, seenEventIds: ['ev_1'] };
		const afterRestart = webhookContext({ body: raw, headers: signed(raw), staticData: saved, workflowId: 'wf_r' });
		expect((await trigger.webhook.call(afterRestart.ctx)).workflowData).toBeUndefined();
		// Concurrent: n8n gave each request its own copy of the static data, not yet saved.
		const a = webhookContext({ body: raw, headers: signed(raw), staticData: { webhookId: 'wh_1', secret }, workflowId: 'wf_c' });
		const b = webhookContext({ body: raw, headers: signed(raw), staticData: { webhookId: 'wh_1', secret }, workflowId: 'wf_c' });
		const outs = await Promise.all([trigger.webhook.call(a.ctx), trigger.webhook.call(b.ctx)]);
		expect(outs.filter((o) => o.workflowData !== undefined)).toHaveLength(1);
		// Different workflows listening to the same bridge each get the event.
		const elsewhere = webhookContext({ body: raw, headers: signed(raw), staticData: { webhookId: 'wh_9', secret }, workflowId: 'wf_other' });
		expect((await trigger.webhook.call(elsewhere.ctx)).workflowData).toHaveLength(1);
	});

	it('does not remember a delivery it refused (bad signature), so the genuine one still starts', async () => {
		const staticData: IDataObject = { webhookId: 'wh_1', secret };
		const forged = webhookContext({
			body: raw,
			headers: { 'x-voxbridge-timestamp': nowTs(), 'x-voxbridge-signature': 'sha256=' + '0'.repeat(64) },
			staticData,
			workflowId: 'wf_forged',
		});
		expect(await trigger.webhook.call(forged.ctx)).toEqual({ noWebhookResponse: true });
		expect(staticData.seenEventIds).toBeUndefined();
		const genuine = webhookContext({ body: raw, headers: signed(raw), staticData, workflowId: 'wf_forged' });
		expect((await trigger.webhook.call(genuine.ctx)).workflowData).toHaveLength(1);
	});

	it('emits the event JSON for a valid signature', async () => {
		const ts = nowTs();
		const { ctx, res } = webhookContext({
			body: raw,
			headers: { 'x-voxbridge-timestamp': ts, 'x-voxbridge-signature': sign(secret, ts, raw) },
		});
		const out = await trigger.webhook.call(ctx);
		expect(out.workflowData).toEqual([[{ json: event }]]);
		expect(res.status).not.toHaveBeenCalled();
	});

	it.each([
		['a tampered body', (ts: string) => ({ body: raw.replace('caller-hangup', 'x'), sig: sign(secret, ts, raw) })],
		['a wrong secret', (ts: string) => ({ body: raw, sig: sign('0'.repeat(64), ts, raw) })],
		['no signature', () => ({ body: raw, sig: undefined })],
	])('answers 401 and starts nothing for %s', async (_name, make) => {
		const ts = nowTs();
		const { body, sig } = make(ts);
		const { ctx, res } = webhookContext({
			body,
			headers: { 'x-voxbridge-timestamp': ts, 'x-voxbridge-signature': sig },
		});
		const out = await trigger.webhook.call(ctx);
		expect(out).toEqual({ noWebhookResponse: true });
		expect(res.status).toHaveBeenCalledWith(401);
	});

	it('answers 401 for a stale timestamp (default tolerance 5 minutes), accepts it with a larger tolerance', async () => {
		const ts = String(Math.floor(Date.now() / 1000) - 600);
		const headers = { 'x-voxbridge-timestamp': ts, 'x-voxbridge-signature': sign(secret, ts, raw) };
		const stale = webhookContext({ body: raw, headers });
		expect(await trigger.webhook.call(stale.ctx)).toEqual({ noWebhookResponse: true });
		expect(stale.res.status).toHaveBeenCalledWith(401);
		expect(stale.res.json).toHaveBeenCalledWith({ error: 'invalid signature', reason: 'stale timestamp' });

		const relaxed = webhookContext({ body: raw, headers, options: { toleranceSeconds: 900 } });
		expect((await trigger.webhook.call(relaxed.ctx)).workflowData).toEqual([[{ json: event }]]);
	});

	it('answers 401 when the node has no secret (never activated with the bridge)', async () => {
		const ts = nowTs();
		const { ctx, res } = webhookContext({
			body: raw,
			headers: { 'x-voxbridge-timestamp': ts, 'x-voxbridge-signature': sign(secret, ts, raw) },
			staticData: {},
		});
		expect(await trigger.webhook.call(ctx)).toEqual({ noWebhookResponse: true });
		expect(res.status).toHaveBeenCalledWith(401);
	});

	it('acknowledges but does not start the workflow for an event type not selected', async () => {
		const ts = nowTs();
		const { ctx } = webhookContext({
			body: raw,
			headers: { 'x-voxbridge-timestamp': ts, 'x-voxbridge-signature': sign(secret, ts, raw) },
			events: ['transcript'],
		});
		const out = await trigger.webhook.call(ctx);
		expect(out.workflowData).toBeUndefined();
	});
});

describe('Delivery memory', () => {
	it('is bounded: the least recently seen ids are forgotten first', () => {
		const stored: { seenEventIds?: string[] } = {};
		for (let i = 0; i < 10; i++) expect(firstDelivery(stored, 'k1', `e${i}`, 4)).toBe(true);
		expect(stored.seenEventIds).toEqual(['e6', 'e7', 'e8', 'e9']);
		expect(firstDelivery(stored, 'k1', 'e7', 4)).toBe(false); // seen again: now the most recent
		expect(stored.seenEventIds).toEqual(['e6', 'e8', 'e9', 'e7']);
		forgetDeliveries('k1');
		expect(firstDelivery(stored, 'k1', 'e0', 4)).toBe(true); // forgotten everywhere
		expect(stored.seenEventIds).toEqual(['e8', 'e9', 'e7', 'e0']);
	});

	it('keeps a few hundred ids by default', () => {
		const stored: { seenEventIds?: string[] } = {};
		for (let i = 0; i < SEEN_EVENT_IDS + 50; i++) firstDelivery(stored, 'k2', `id${i}`);
		expect(stored.seenEventIds).toHaveLength(SEEN_EVENT_IDS);
		expect(firstDelivery(stored, 'k2', `id${SEEN_EVENT_IDS + 49}`)).toBe(false);
		forgetDeliveries('k2');
		expect(firstDelivery(stored, 'k2', 'id0')).toBe(true);
	});
});
