import { randomBytes } from 'crypto';
import {
	NodeApiError,
	NodeConnectionTypes,
	type IDataObject,
	type IHookFunctions,
	type IHttpRequestMethods,
	type IHttpRequestOptions,
	type INodeType,
	type INodeTypeDescription,
	type IWebhookFunctions,
	type IWebhookResponseData,
	type JsonObject,
} from 'n8n-workflow';
import { firstDelivery, forgetDeliveries } from './dedupe';
import { VOXBRIDGE_EVENTS } from './events';
import { verifySignature } from './signature';

interface VoxbridgeWebhook {
	id: string;
	url: string;
	events?: string[];
}

interface NodeStaticData extends IDataObject {
	webhookId?: string;
	secret?: string;
	events?: string[];
	/** Ids of the events already delivered, oldest first (bounded: see dedupe.ts). */
	seenEventIds?: string[];
}

function nodeKey(fn: IHookFunctions | IWebhookFunctions): string {
	return `${fn.getWorkflow().id ?? ''}:${fn.getNode().name}`;
}

function httpStatus(error: unknown): number | undefined {
	const e = error as { httpCode?: string; cause?: { status?: number; response?: { status?: number } } };
	if (e?.httpCode) return Number(e.httpCode);
	return e?.cause?.status ?? e?.cause?.response?.status;
}

async function voxbridgeApiRequest(
	this: IHookFunctions,
	method: IHttpRequestMethods,
	path: string,
	body?: IDataObject,
	okStatuses: number[] = [],
): Promise<IDataObject> {
	const credentials = await this.getCredentials('voxbridgeApi');
	const baseUrl = String(credentials.baseUrl ?? '').replace(/\/+$/, '');
	const options: IHttpRequestOptions = {
		method,
		url: `${baseUrl}/v1${path}`,
		json: true,
	};
	if (body !== undefined) {
		options.body = body;
	}
	try {
		return ((await this.helpers.httpRequestWithAuthentication.call(
			this,
			'voxbridgeApi',
			options,
		)) ?? {}) as IDataObject;
	} catch (error) {
		const status = httpStatus(error);
		if (status !== undefined && okStatuses.includes(status)) {
			return {};
		}
		throw new NodeApiError(this.getNode(), error as JsonObject);
	}
}

function sameEvents(a: string[] | undefined, b: string[]): boolean {
	if (!a) return false;
	const x = [...a].sort();
	const y = [...b].sort();
	return x.length === y.length && x.every((v, i) => v === y[i]);
}

export class VoxbridgeTrigger implements INodeType {
	description: INodeTypeDescription = {
		displayName: 'Voxbridge Trigger',
		name: 'voxbridgeTrigger',
		icon: { light: 'file:../../icons/voxbridge.svg', dark: 'file:../../icons/voxbridge.dark.svg' },
		group: ['trigger'],
		version: 1,
		subtitle: '={{($parameter["events"] || []).join(", ")}}',
		description:
			'Starts the workflow on voxbridge call events: call started, answered, ended (with transcript) or failed, transcripts, tool calls, DTMF, mid-call commands, silence. Each event starts it once, even when the bridge delivers it again.',
		defaults: {
			name: 'Voxbridge Trigger',
		},
		inputs: [],
		outputs: [NodeConnectionTypes.Main],
		credentials: [
			{
				name: 'voxbridgeApi',
				required: true,
			},
		],
		webhooks: [
			{
				name: 'default',
				httpMethod: 'POST',
				responseMode: 'onReceived',
				path: 'webhook',
			},
		],
		properties: [
			{
				displayName: 'Events',
				name: 'events',
				type: 'multiOptions',
				required: true,
				default: ['call.ended'],
				description:
					'The events to receive. The bridge posts them to this workflow once it is active; every event carries data.metadata from the request that started the call.',
				options: VOXBRIDGE_EVENTS,
			},
			{
				displayName: 'Options',
				name: 'options',
				type: 'collection',
				placeholder: 'Add Option',
				default: {},
				options: [
					{
						displayName: 'Timestamp Tolerance (Seconds)',
						name: 'toleranceSeconds',
						type: 'number',
						typeOptions: {
							minValue: 0,
						},
						default: 300,
						description:
							'Reject deliveries whose X-Voxbridge-Timestamp is further than this from now (replay protection); 0 turns the check off',
					},
				],
			},
		],
	};

	webhookMethods = {
		default: {
			async checkExists(this: IHookFunctions): Promise<boolean> {
				const webhookUrl = this.getNodeWebhookUrl('default') as string;
				const events = this.getNodeParameter('events', []) as string[];
				const staticData = this.getWorkflowStaticData('node') as NodeStaticData;
				const response = await voxbridgeApiRequest.call(this, 'GET', '/webhooks');
				const webhooks = (response.webhooks ?? []) as VoxbridgeWebhook[];
				let exists = false;
				for (const webhook of webhooks) {
					if (webhook.url !== webhookUrl) continue;
					if (
						!exists &&
						webhook.id === staticData.webhookId &&
						staticData.secret &&
						sameEvents(webhook.events, events)
					) {
						exists = true;
						continue;
					}
					// Ours but unusable (secret lost, events changed) or a duplicate: remove it, so
					// `create` registers a fresh subscription with a secret this node knows.
					await voxbridgeApiRequest.call(
						this,
						'DELETE',
						`/webhooks/${encodeURIComponent(webhook.id)}`,
						undefined,
						[404],
					);
				}
				if (!exists) {
					delete staticData.webhookId;
					delete staticData.secret;
					delete staticData.events;
				}
				return exists;
			},

			async create(this: IHookFunctions): Promise<boolean> {
				const webhookUrl = this.getNodeWebhookUrl('default') as string;
				const events = this.getNodeParameter('events', []) as string[];
				const staticData = this.getWorkflowStaticData('node') as NodeStaticData;
				const secret = randomBytes(32).toString('hex');
				const workflow = this.getWorkflow();
				const response = await voxbridgeApiRequest.call(this, 'POST', '/webhooks', {
					url: webhookUrl,
					events,
					secret,
					description: `n8n workflow ${workflow.name ?? ''} (${workflow.id ?? ''})`.trim(),
				});
				if (typeof response.id !== 'string' || response.id === '') {
					throw new NodeApiError(this.getNode(), response as JsonObject, {
						message: 'The bridge did not return a webhook id',
					});
				}
				staticData.webhookId = response.id;
				staticData.secret = secret;
				staticData.events = events;
				return true;
			},

			async delete(this: IHookFunctions): Promise<boolean> {
				const staticData = this.getWorkflowStaticData('node') as NodeStaticData;
				if (staticData.webhookId) {
					// Already gone on the bridge (404) is what we wanted; anything else is a failure.
					await voxbridgeApiRequest.call(
						this,
						'DELETE',
						`/webhooks/${encodeURIComponent(staticData.webhookId)}`,
						undefined,
						[404],
					);
				}
				delete staticData.webhookId;
				delete staticData.secret;
				delete staticData.events;
				delete staticData.seenEventIds;
				forgetDeliveries(nodeKey(this));
				return true;
			},
		},
	};

	async webhook(this: IWebhookFunctions): Promise<IWebhookResponseData> {
		const req = this.getRequestObject() as unknown as {
			rawBody?: Buffer;
			readRawBody?: () => Promise<void>;
			body?: unknown;
		};
		const headers = this.getHeaderData() as IDataObject;
		const staticData = this.getWorkflowStaticData('node') as NodeStaticData;
		const options = this.getNodeParameter('options', {}) as { toleranceSeconds?: number };
		const events = this.getNodeParameter('events', []) as string[];

		if (!req.rawBody && typeof req.readRawBody === 'function') {
			await req.readRawBody();
		}
		const rawBody = req.rawBody ?? Buffer.from(JSON.stringify(req.body ?? {}), 'utf8');

		const check = verifySignature({
			secret: staticData.secret ?? '',
			timestamp: headers['x-voxbridge-timestamp'] as string | undefined,
			signature: headers['x-voxbridge-signature'] as string | undefined,
			rawBody,
			toleranceSeconds: options.toleranceSeconds ?? 300,
		});
		if (!check.valid) {
			const res = this.getResponseObject();
			res.status(401).json({ error: 'invalid signature', reason: check.reason });
			return { noWebhookResponse: true };
		}

		let event: IDataObject;
		try {
			event = JSON.parse(rawBody.toString('utf8')) as IDataObject;
		} catch (error) {
			const res = this.getResponseObject();
			res.status(400).json({ error: 'body is not JSON', reason: (error as Error).message });
			return { noWebhookResponse: true };
		}
		if (events.length > 0 && !events.includes(String(event.type))) {
			// Signed, but not an event this trigger listens to: acknowledge, start nothing.
			return { webhookResponse: { status: 'ignored' } };
		}
		// At-least-once delivery: a retry of an event already started is acknowledged (so the
		// bridge stops retrying) and starts nothing.
		if (typeof event.id === 'string' && event.id !== '' && !firstDelivery(staticData, nodeKey(this), event.id)) {
			return { webhookResponse: { status: 'duplicate', id: event.id } };
		}
		return {
			workflowData: [this.helpers.returnJsonArray(event)],
		};
	}
}
