// A Node verifier for the rollover soak (python -m benchmarks.soak): npm `jose`.
//
// createRemoteJWKSet caches the JWKS for `cacheMaxAge` and refetches on an
// unknown kid only once `cooldownDuration` has passed since the last fetch:
// exactly how a Node service using jose behaves. Tokens come from the issuer's
// queue file (JSON lines, tailed); each is verified on arrival ("fresh") and
// again `--late-margin` seconds before its `exp` ("late"). One JSON line per
// check (and per JWKS fetch) goes to `--out`. `--alg` is the algorithm
// allowlist, comma-separated (old and new ones during a migration).
//
// usage: node verify_node.mjs --url URL --queue FILE --out FILE --alg ES256[,EdDSA...]
//          --lifetime S --cooldown S --leeway S [--late-margin S] [--timeout S]

import { createRemoteJWKSet, customFetch, jwtVerify } from 'jose'
import { appendFileSync, openSync, readSync } from 'node:fs'
import { parseArgs } from 'node:util'

const { values: a } = parseArgs({
  options: {
    url: { type: 'string' },
    queue: { type: 'string' },
    out: { type: 'string' },
    alg: { type: 'string' },
    lifetime: { type: 'string' },
    cooldown: { type: 'string' },
    leeway: { type: 'string' },
    'late-margin': { type: 'string', default: '0.5' },
    timeout: { type: 'string', default: '5' },
  },
})
for (const k of ['url', 'queue', 'out', 'alg', 'lifetime', 'cooldown', 'leeway']) {
  if (a[k] === undefined) {
    console.error(`verify_node.mjs: --${k} is required`)
    process.exit(2)
  }
}
const lateMargin = Number(a['late-margin'])
const now = () => Date.now() / 1000

function write(rec) {
  appendFileSync(a.out, JSON.stringify({ t: now(), ...rec }) + '\n')
}

async function loggingFetch(url, options) {
  const resp = await fetch(url, options)
  const body = await resp.clone().json().catch(() => null)
  const kids = (body?.keys ?? []).map((k) => k.kid ?? '').sort()
  write({ ev: 'fetch', kids })
  return resp
}

const JWKS = createRemoteJWKSet(new URL(a.url), {
  cacheMaxAge: Number(a.lifetime) * 1000,
  cooldownDuration: Number(a.cooldown) * 1000,
  timeoutDuration: Math.round(Number(a.timeout) * 1000),
  [customFetch]: loggingFetch,
})

async function check(rec, phase) {
  if (now() >= rec.exp) {
    write({ ev: 'skip', seq: rec.seq, phase, why: 'expired before checked' })
    return
  }
  try {
    await jwtVerify(rec.token, JWKS, {
      algorithms: a.alg.split(',').filter(Boolean),
      clockTolerance: Number(a.leeway),
      requiredClaims: ['exp', 'iat'],
    })
    write({ ev: 'check', seq: rec.seq, phase, ok: true, kid: rec.kid })
  } catch (e) {
    const reason = `${e?.code ?? e?.name ?? 'Error'}: ${e?.message ?? e}`.slice(0, 300)
    write({ ev: 'check', seq: rec.seq, phase, ok: false, kid: rec.kid, reason })
  }
}

const fd = openSync(a.queue, 'r')
let pos = 0
let buf = ''
let ended = false
const late = [] // [due, rec], kept sorted by due
const chunk = Buffer.alloc(1 << 20)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

while (!ended || late.length > 0) {
  let busy = false
  if (!ended) {
    let n
    while ((n = readSync(fd, chunk, 0, chunk.length, pos)) > 0) {
      pos += n
      buf += chunk.toString('utf8', 0, n)
    }
    const lines = buf.split('\n')
    buf = lines.pop()
    for (const line of lines) {
      const rec = JSON.parse(line)
      if (rec.end) {
        ended = true
        break
      }
      await check(rec, 'fresh')
      const due = rec.exp - lateMargin
      let i = late.length
      while (i > 0 && late[i - 1][0] > due) i--
      late.splice(i, 0, [due, rec])
      busy = true
    }
  }
  while (late.length > 0 && late[0][0] <= now()) {
    await check(late.shift()[1], 'late')
    busy = true
  }
  if (!busy) await sleep(10)
}
write({ ev: 'done' })
