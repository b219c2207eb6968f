// A Node issuer of keymgr's signing service (tests/test_service.py): undici over
// the Unix socket or over TLS with a client certificate, npm `jose` to verify.
//
// It asks for a token every --interval ms, for --duration s or until it has
// seen --until-kids signing keys, and verifies each token at once against the
// JWKS file as it is on disk then; at every step it also verifies again every
// earlier token still inside its lifetime (what a verifier would do with them
// across a promotion). One JSON line per request on stdout, then a summary.
//
// usage: node client.mjs (--socket PATH | --url https://HOST:PORT --ca F --cert F --key F)
//          --ring R [--ttl 2s] [--jwks FILE] [--duration S] [--interval MS]
//          [--until-kids N] [--count N] [--info]

import { createLocalJWKSet, decodeProtectedHeader, jwtVerify } from 'jose'
import { readFileSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { Agent, request } from 'undici'

const { values: a } = parseArgs({
  options: {
    socket: { type: 'string' },
    url: { type: 'string' },
    ca: { type: 'string' },
    cert: { type: 'string' },
    key: { type: 'string' },
    ring: { type: 'string', default: 'default' },
    ttl: { type: 'string' },
    jwks: { type: 'string' },
    duration: { type: 'string', default: '30' },
    interval: { type: 'string', default: '100' },
    'until-kids': { type: 'string', default: '0' },
    count: { type: 'string', default: '0' },
    info: { type: 'boolean', default: false },
  },
})

const out = (rec) => process.stdout.write(JSON.stringify(rec) + '\n')
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const now = () => Date.now() / 1000

let dispatcher
let base
if (a.socket) {
  dispatcher = new Agent({ connect: { socketPath: a.socket } })
  base = 'http://localhost'
} else {
  const read = (f) => (f ? readFileSync(f) : undefined)
  dispatcher = new Agent({ connect: { ca: read(a.ca), cert: read(a.cert), key: read(a.key) } })
  base = a.url
}

async function call(method, path, body) {
  try {
    const res = await request(base + path, {
      method,
      dispatcher,
      headers: body ? { 'content-type': 'application/json' } : {},
      body: body ? JSON.stringify(body) : undefined,
    })
    const text = await res.body.text()
    let doc = null
    try {
      doc = JSON.parse(text)
    } catch {}
    return { status: res.statusCode, doc, type: res.headers['content-type'] }
  } catch (e) {
    // No HTTP answer at all: a refused connection, a failed TLS handshake, ...
    const c = e?.cause ?? e
    return { status: 0, error: `${c?.code ?? e?.code ?? c?.name}: ${c?.message ?? e?.message}` }
  }
}

function jwks() {
  return createLocalJWKSet(JSON.parse(readFileSync(a.jwks, 'utf8')))
}

async function verify(token, keys, at) {
  try {
    const { payload, protectedHeader } = await jwtVerify(token, keys, {
      algorithms: ['ES256', 'ES384', 'ES512', 'EdDSA', 'RS256', 'PS256'],
      typ: 'JWT',
      requiredClaims: ['iat', 'exp'],
      currentDate: new Date(at * 1000),
    })
    return { ok: true, payload, header: protectedHeader }
  } catch (e) {
    return { ok: false, reason: `${e?.code ?? e?.name}: ${e?.message}` }
  }
}

const kids = []
const live = [] // [token, exp]
let sent = 0
let signed = 0
let failures = 0
let lateChecks = 0
const deadline = now() + Number(a.duration)
const count = Number(a.count)
const untilKids = Number(a['until-kids'])

while (now() < deadline) {
  if (count && sent >= count) break
  if (untilKids && kids.length >= untilKids) break
  sent++
  if (a.info) {
    const r = await call('GET', `/v1/rings/${a.ring}`)
    out({ ev: 'info', status: r.status, doc: r.doc, error: r.error })
  }
  const body = { claims: { sub: 'node-client', jti: String(sent) } }
  if (a.ttl) body.ttl = /^\d+$/.test(a.ttl) ? Number(a.ttl) : a.ttl
  const r = await call('POST', `/v1/rings/${a.ring}/sign`, body)
  const rec = { ev: 'sign', seq: sent, status: r.status, type: r.type, error: r.error }
  if (r.status !== 200) {
    rec.code = r.doc?.error?.code
    rec.message = r.doc?.error?.message
    out(rec)
  } else {
    const token = r.doc.token
    const header = decodeProtectedHeader(token)
    rec.kid = header.kid
    rec.token = token
    if (!kids.includes(header.kid)) kids.push(header.kid)
    signed++
    if (a.jwks) {
      const t = now()
      const keys = jwks()
      const v = await verify(token, keys, t)
      rec.verified = v.ok
      if (!v.ok) {
        rec.reason = v.reason
        failures++
      } else {
        live.push([token, v.payload.exp])
      }
      // Every earlier token still inside its lifetime must verify against
      // the JWKS served now, whichever key signed it.
      for (const [old, exp] of live) {
        if (old === token || exp <= t) continue
        const w = await verify(old, keys, t)
        lateChecks++
        if (!w.ok) {
          failures++
          out({ ev: 'late-failure', token: old, reason: w.reason })
        }
      }
      while (live.length && live[0][1] <= t) live.shift()
    }
    out(rec)
  }
  await sleep(Number(a.interval))
}
out({ ev: 'done', sent, signed, failures, kids, late_checks: lateChecks })
await dispatcher.close()
