import { createHmac, timingSafeEqual } from 'crypto';

export interface SignatureCheck {
	/** The subscription secret the node registered with the bridge. */
	secret: string;
	/** The X-Voxbridge-Timestamp header (unix seconds). */
	timestamp: string | undefined;
	/** The X-Voxbridge-Signature header: "sha256=<hex>". */
	signature: string | undefined;
	/** The request body exactly as received. */
	rawBody: Buffer | string;
	/** Largest accepted difference between the timestamp and now, in seconds; 0 = no check. */
	toleranceSeconds: number;
	/** Now, in unix seconds (for tests). */
	nowSeconds?: number;
}

export type SignatureResult = { valid: true } | { valid: false; reason: string };

/** hex HMAC-SHA256(secret, `${timestamp}.${rawBody}`), the way the bridge signs deliveries. */
export function computeSignature(secret: string, timestamp: string, rawBody: Buffer | string): string {
	const hmac = createHmac('sha256', secret);
	hmac.update(`${timestamp}.`);
	hmac.update(typeof rawBody === 'string' ? Buffer.from(rawBody, 'utf8') : rawBody);
	return hmac.digest('hex');
}

/**
 * Check a delivery's X-Voxbridge-Signature (constant-time comparison) and the freshness of its
 * X-Voxbridge-Timestamp, so a captured delivery cannot be replayed later.
 */
export function verifySignature(check: SignatureCheck): SignatureResult {
	const { secret, timestamp, signature, rawBody, toleranceSeconds } = check;
	if (!secret) {
		return { valid: false, reason: 'no webhook secret stored: re-activate the workflow' };
	}
	if (!timestamp || !/^\d{1,12}$/.test(timestamp)) {
		return { valid: false, reason: 'missing or malformed X-Voxbridge-Timestamp' };
	}
	if (!signature || !/^sha256=[0-9a-fA-F]{64}$/.test(signature)) {
		return { valid: false, reason: 'missing or malformed X-Voxbridge-Signature' };
	}
	const expected = Buffer.from(computeSignature(secret, timestamp, rawBody), 'hex');
	const given = Buffer.from(signature.slice('sha256='.length), 'hex');
	if (expected.length !== given.length || !timingSafeEqual(expected, given)) {
		return { valid: false, reason: 'signature mismatch' };
	}
	if (toleranceSeconds > 0) {
		const now = check.nowSeconds ?? Math.floor(Date.now() / 1000);
		if (Math.abs(now - Number(timestamp)) > toleranceSeconds) {
			return { valid: false, reason: 'stale timestamp' };
		}
	}
	return { valid: true };
}
