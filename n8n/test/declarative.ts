/**
 * A small model of how n8n's RoutingNode turns a declarative node description into an HTTP
 * request, for the subset of features this package uses: `requestDefaults`, an operation's
 * `routing.request` (method, url), and `routing.send` on properties and collection options
 * (`type: body | query`, `property`, `value`), with `={{ … }}` expressions over `$parameter`,
 * `$value` and `$credentials`, and `displayOptions.show` deciding which properties apply.
 * Real n8n executing these descriptions is covered by the e2e test (tests/e2e/test_n8n.py).
 */
import type {
	IDataObject,
	INodeProperties,
	INodePropertyCollection,
	INodePropertyOptions,
	INodeTypeDescription,
} from 'n8n-workflow';

export interface BuiltRequest {
	method: string;
	baseURL: string;
	url: string;
	qs: IDataObject;
	body: IDataObject;
	headers: IDataObject;
	paginate?: unknown;
	pagination?: unknown;
	maxResults?: unknown;
	postReceive?: unknown;
}

type Scope = { $parameter: IDataObject; $value?: unknown; $credentials?: IDataObject };

function evaluate(code: string, scope: Scope): unknown {
	// eslint-disable-next-line @n8n/community-nodes/no-dangerous-functions -- test-only model of n8n expressions
	const fn = new Function('$parameter', '$value', '$credentials', `return (${code});`);
	return fn(scope.$parameter, scope.$value, scope.$credentials);
}

/** Resolve an n8n parameter value: `={{ expr }}` alone keeps its type, else a string template. */
export function resolve(value: unknown, scope: Scope): unknown {
	if (typeof value !== 'string' || !value.startsWith('=')) return value;
	const text = value.slice(1);
	const whole = /^\{\{([\s\S]*)\}\}$/.exec(text.trim());
	if (whole && !whole[1].includes('}}')) return evaluate(whole[1], scope);
	return text.replace(/\{\{([\s\S]*?)\}\}/g, (_m, code: string) => String(evaluate(code, scope)));
}

function shown(prop: INodeProperties, params: IDataObject): boolean {
	const show = prop.displayOptions?.show;
	if (!show) return true;
	return Object.entries(show).every(([name, allowed]) =>
		(allowed as unknown[]).includes(params[name] as unknown),
	);
}

function applySend(
	req: BuiltRequest,
	send: IDataObject | undefined,
	value: unknown,
	params: IDataObject,
	credentials: IDataObject,
): void {
	if (!send) return;
	if (send.paginate !== undefined) {
		req.paginate = resolve(send.paginate, { $parameter: params, $value: value, $credentials: credentials });
	}
	if (!send.property) return;
	const resolved =
		send.value !== undefined
			? resolve(send.value, { $parameter: params, $value: value, $credentials: credentials })
			: value;
	if (resolved === undefined) return;
	const target = send.type === 'query' ? req.qs : req.body;
	target[send.property as string] = resolved as IDataObject;
}

/**
 * The request the node's `resource`/`operation` sends for the given parameters. Parameters not
 * given take the property's default, as in the editor.
 */
export function buildRequest(
	description: INodeTypeDescription,
	given: IDataObject,
	credentials: IDataObject = { baseUrl: 'http://127.0.0.1:8080', apiToken: 't' },
): BuiltRequest {
	const params: IDataObject = {};
	for (const prop of description.properties) {
		if (prop.name in params) continue;
		if (shown(prop, { ...params, ...given })) {
			params[prop.name] = (given[prop.name] ?? prop.default) as IDataObject;
		}
	}
	Object.assign(params, given);

	const defaults = description.requestDefaults ?? {};
	const req: BuiltRequest = {
		method: (defaults.method as string) ?? 'GET',
		baseURL: String(resolve(defaults.baseURL, { $parameter: params, $credentials: credentials })),
		url: '',
		qs: {},
		body: {},
		headers: { ...(defaults.headers as IDataObject) },
	};

	for (const prop of description.properties) {
		if (!shown(prop, params)) continue;
		const value = params[prop.name];
		if (prop.name === 'operation' || prop.name === 'resource') {
			const option = (prop.options as INodePropertyOptions[]).find((o) => o.value === value);
			const request = option?.routing?.request;
			if (request) {
				if (request.method) req.method = request.method;
				if (request.url) req.url = String(resolve(request.url, { $parameter: params, $credentials: credentials }));
			}
			const output = option?.routing?.output;
			if (output?.postReceive) req.postReceive = output.postReceive;
			continue;
		}
		const routing = prop.routing;
		applySend(req, routing?.send as IDataObject | undefined, value, params, credentials);
		if (routing?.operations?.pagination && req.paginate) req.pagination = routing.operations.pagination;
		if (routing?.output?.maxResults !== undefined) {
			req.maxResults = resolve(routing.output.maxResults, { $parameter: params, $value: value });
		}
		if (prop.type === 'collection' && value && typeof value === 'object') {
			for (const option of (prop.options ?? []) as INodeProperties[]) {
				const v = (value as IDataObject)[option.name];
				if (v === undefined) continue;
				applySend(req, option.routing?.send as IDataObject | undefined, v, params, credentials);
			}
		}
		if (prop.type === 'fixedCollection') {
			// (fixedCollection routing is on the property itself, handled above)
			void (prop.options as INodePropertyCollection[]);
		}
	}
	if (req.paginate === false) {
		delete req.pagination;
	}
	return req;
}
