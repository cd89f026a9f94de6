/**
 * The bridge delivers each event at least once: a delivery whose answer it did not get (a timeout,
 * a restart) is sent again, with the same event id. The trigger starts a workflow once per id.
 *
 * Two memories, both bounded (least recently seen ids forgotten first):
 * - the node's static data (`seenEventIds`), which n8n saves with the workflow after each webhook
 *   call, so a retry arriving after an n8n restart is still recognised;
 * - this process's own, per workflow and node, for a retry that arrives while the first delivery
 *   is still running (before n8n has saved the static data).
 */
export const SEEN_EVENT_IDS = 500;

const processMemory = new Map<string, Map<string, true>>();
const MAX_NODES = 1000;

function remember(order: string[] | Map<string, true>, id: string, limit: number): void {
	if (Array.isArray(order)) {
		const at = order.indexOf(id);
		if (at >= 0) order.splice(at, 1);
		order.push(id);
		if (order.length > limit) order.splice(0, order.length - limit);
		return;
	}
	order.delete(id);
	order.set(id, true);
	while (order.size > limit) {
		const oldest = order.keys().next().value as string;
		order.delete(oldest);
	}
}

/**
 * True if `id` is new for this node (and remember it); false for a duplicate delivery.
 * `nodeKey` names the workflow and node; `stored` is the node's static data.
 */
export function firstDelivery(
	stored: { seenEventIds?: string[] },
	nodeKey: string,
	id: string,
	limit: number = SEEN_EVENT_IDS,
): boolean {
	let local = processMemory.get(nodeKey);
	const seen = Array.isArray(stored.seenEventIds) ? stored.seenEventIds : [];
	const duplicate = seen.includes(id) || (local?.has(id) ?? false);
	if (!local) {
		local = new Map();
		processMemory.set(nodeKey, local);
		while (processMemory.size > MAX_NODES) {
			processMemory.delete(processMemory.keys().next().value as string);
		}
	}
	remember(seen, id, limit);
	remember(local, id, limit);
	stored.seenEventIds = seen;
	return !duplicate;
}

/** Forget this process's memory (tests; a node whose webhook was deleted). */
export function forgetDeliveries(nodeKey?: string): void {
	if (nodeKey === undefined) processMemory.clear();
	else processMemory.delete(nodeKey);
}
