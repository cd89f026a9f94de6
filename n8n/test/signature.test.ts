import { createHmac } from 'crypto';
import { computeSignature, verifySignature } from '../nodes/VoxbridgeTrigger/signature';

const secret = 'a'.repeat(64);
const body = '{"id":"ev1","type":"call.ended","call_id":"c1","ts":1700000000.5,"seq":7,"data":{}}';
const ts = '1700000000';
const now = 1700000010;

function sign(s: string, t: string, b: string): string {
	return 'sha256=' + createHmac('sha256', s).update(`${t}.${b}`).digest('hex');
}

describe('computeSignature', () => {
	it('is hex HMAC-SHA256(secret, "<timestamp>.<raw body>")', () => {
		expect('sha256=' + computeSignature(secret, ts, body)).toBe(sign(secret, ts, body));
		expect(computeSignature(secret, ts, Buffer.from(body))).toBe(computeSignature(secret, ts, body));
	});
});

describe('verifySignature', () => {
	const base = { secret, timestamp: ts, rawBody: body, toleranceSeconds: 300, nowSeconds: now };

	it('accepts a valid signature', () => {
		expect(verifySignature({ ...base, signature: sign(secret, ts, body) })).toEqual({ valid: true });
	});

	it('accepts upper-case hex', () => {
		const sig = 'sha256=' + computeSignature(secret, ts, body).toUpperCase();
		expect(verifySignature({ ...base, signature: sig }).valid).toBe(true);
	});

	it('rejects a tampered body', () => {
		const tampered = body.replace('call.ended', 'call.failed');
		expect(verifySignature({ ...base, rawBody: tampered, signature: sign(secret, ts, body) })).toEqual({
			valid: false,
			reason: 'signature mismatch',
		});
	});

	it('rejects a signature made with another secret', () => {
		expect(verifySignature({ ...base, signature: sign('b'.repeat(64), ts, body) }).valid).toBe(false);
	});

	it('rejects a signature over another timestamp (the timestamp is signed)', () => {
		expect(verifySignature({ ...base, signature: sign(secret, '1700000001', body) }).valid).toBe(false);
	});

	it('rejects a stale timestamp, and one from the future, beyond the tolerance', () => {
		const old = String(now - 301);
		expect(verifySignature({ ...base, timestamp: old, signature: sign(secret, old, body) })).toEqual({
			valid: false,
			reason: 'stale timestamp',
		});
		const future = String(now + 301);
		expect(verifySignature({ ...base, timestamp: future, signature: sign(secret, future, body) }).valid).toBe(
			false,
		);
		const edge = String(now - 300);
		expect(verifySignature({ ...base, timestamp: edge, signature: sign(secret, edge, body) }).valid).toBe(true);
	});

	it('honours a custom tolerance, and 0 turns the freshness check off', () => {
		const old = String(now - 3600);
		const signature = sign(secret, old, body);
		expect(verifySignature({ ...base, timestamp: old, signature, toleranceSeconds: 7200 }).valid).toBe(true);
		expect(verifySignature({ ...base, timestamp: old, signature, toleranceSeconds: 0 }).valid).toBe(true);
		expect(verifySignature({ ...base, timestamp: old, signature, toleranceSeconds: 60 }).valid).toBe(false);
	});

	it('rejects missing or malformed headers and a missing secret', () => {
		const signature = sign(secret, ts, body);
		expect(verifySignature({ ...base, signature: undefined }).valid).toBe(false);
		expect(verifySignature({ ...base, signature: signature.slice(7) }).valid).toBe(false);
		expect(verifySignature({ ...base, signature: signature.slice(0, -2) }).valid).toBe(false);
		expect(verifySignature({ ...base, timestamp: undefined, signature }).valid).toBe(false);
		expect(verifySignature({ ...base, timestamp: '17e8', signature }).valid).toBe(false);
		expect(verifySignature({ ...base, secret: '', signature }).valid).toBe(false);
	});
});
