// Independent reference for medledger's transaction signing (docs/transactions.md), written
// against the WebCrypto API alone (crypto.subtle, as in every browser), so that a patient's
// browser can sign exactly what the ledger verifies. Runs under Node.js 20+.
//
//   node sign_tx.mjs vector                      check the fixed test vector, print its id
//   node sign_tx.mjs register-patient CHAIN_ID   print a signed patient registration (JSON)

const subtle = globalThis.crypto.subtle;
const encoder = new TextEncoder();
const SIGNING_PREFIX = encoder.encode("medledger/tx/v1\n");

// RFC 8785 restricted to the ledger's values: integers only, keys in UTF-16 order (which is
// what the default Array.prototype.sort compares), strings as JSON.stringify writes them.
function canonical(value) {
  if (value === null || typeof value === "boolean") return JSON.stringify(value);
  if (typeof value === "number") {
    if (!Number.isSafeInteger(value)) throw new Error(`not a safe integer: ${value}`);
    return String(value);
  }
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  const keys = Object.keys(value).sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
}

const concat = (...parts) => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
};
const b64url = (bytes) => Buffer.from(bytes).toString("base64url");
const hex = (bytes) => Buffer.from(bytes).toString("hex");
const sha256 = async (bytes) => new Uint8Array(await subtle.digest("SHA-256", bytes));

async function pseudonym(publicKey) {
  const digest = await sha256(concat(encoder.encode("medledger/patient/v1\0"), publicKey));
  return "pt-" + hex(digest.slice(0, 20));
}

const signingBytes = (payload) => concat(SIGNING_PREFIX, encoder.encode(canonical(payload)));
const ECDSA = { name: "ECDSA", hash: "SHA-256" };

async function sign(payload, privateKey) {
  const message = signingBytes(payload);
  // WebCrypto returns the IEEE P1363 form r || s: the ledger's signature encoding.
  const signature = new Uint8Array(await subtle.sign(ECDSA, privateKey, message));
  return { tx: { payload, signature: b64url(signature) }, tx_id: hex(await sha256(message)) };
}

// The vector of docs/transactions.md: its public key, payload and one valid signature.
const VECTOR = {
  public_key: "BPBj9QBQKahWhNBamCtWlN6gWFn-6zv2FhQnLnRUiC8bSPO01JT4evrmUXKxPp2pqbE7uoE-9XLpk1ih194jvFM",
  signature: "ySYCTw6ey0zhaXUGqP85ez92R8eo63Wo7NGmkmNvFDKUOmv_kTCDtAuQt2e7m7XOrnsc8tTQKvu0yIeD4sqAvg",
  tx_id: "35792b3e4e49f68aa56286dda5ba0b713d817489f013d8789f1e889f8fa3502b",
};

async function checkVector() {
  const publicKey = Buffer.from(VECTOR.public_key, "base64url");
  const payload = {
    chain_id: "medledger-vector",
    signer: await pseudonym(publicKey),
    nonce: 1,
    expires_at_ms: 1767225600000,
    body: { type: "register_patient", public_key: VECTOR.public_key },
  };
  const message = signingBytes(payload);
  const key = await subtle.importKey("raw", publicKey, { name: "ECDSA", namedCurve: "P-256" }, false, ["verify"]);
  const valid = await subtle.verify(ECDSA, key, Buffer.from(VECTOR.signature, "base64url"), message);
  const txId = hex(await sha256(message));
  if (!valid || txId !== VECTOR.tx_id) throw new Error(`vector mismatch: valid=${valid} id=${txId}`);
  return { tx_id: txId, signer: payload.signer, canonical: canonical(payload) };
}

async function registerPatient(chainId) {
  const keys = await subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, false, ["sign", "verify"]);
  const publicKey = new Uint8Array(await subtle.exportKey("raw", keys.publicKey));
  const payload = {
    chain_id: chainId,
    signer: await pseudonym(publicKey),
    nonce: 1,
    expires_at_ms: Date.now() + 60_000,
    body: { type: "register_patient", public_key: b64url(publicKey) },
  };
  return sign(payload, keys.privateKey);
}

const [command = "vector", argument] = process.argv.slice(2);
if (command === "vector") console.log(JSON.stringify(await checkVector()));
else if (command === "register-patient" && argument) console.log(JSON.stringify(await registerPatient(argument)));
else {
  console.error("usage: node sign_tx.mjs vector | register-patient CHAIN_ID");
  process.exit(2);
}
