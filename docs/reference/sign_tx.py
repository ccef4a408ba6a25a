#!/usr/bin/env python3
"""Independent reference for medledger's transaction signing (docs/transactions.md).

Implements the canonical encoding and the signature from the specification alone, with
Python's standard library and the `cryptography` package, so that a third party can check
that what it signs is what the ledger verifies.

    sign_tx.py vector            print the fixed test vector's canonical text, id and a signature
    sign_tx.py register-patient CHAIN_ID
                                 print a signed patient registration with a fresh key, as JSON
"""
import base64
import hashlib
import json
import sys
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

SIGNING_PREFIX = b"medledger/tx/v1\n"
SAFE_INTEGER_MAX = 2**53 - 1


def canonical(value):
    """RFC 8785 restricted to the ledger's values: integers only, keys in UTF-16 order."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        if abs(value) > SAFE_INTEGER_MAX:
            raise ValueError(f"integer {value} is outside ±(2^53 - 1)")
        return str(value)
    if isinstance(value, float):
        raise ValueError("floats are not allowed")
    if isinstance(value, str):
        # json.dumps escapes exactly as ECMAScript's JSON.stringify for these inputs:
        # quote, backslash, \b \t \n \f \r by name, other C0 controls as \u00xx.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(canonical(item) for item in value) + "]"
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: k.encode("utf-16-be"))
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + canonical(value[k]) for k in keys) + "}"
    raise TypeError(type(value))


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_key_sec1(private_key):
    return private_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def pseudonym(public_key):
    digest = hashlib.sha256(b"medledger/patient/v1\0" + public_key).hexdigest()
    return "pt-" + digest[:40]


def sign(payload, private_key):
    message = SIGNING_PREFIX + canonical(payload).encode()
    der = private_key.sign(message, ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return {"payload": payload, "signature": b64url(signature)}, hashlib.sha256(message).hexdigest()


# The fixed test vector of docs/transactions.md. The private key is for this vector only.
VECTOR_PRIVATE_KEY = int(hashlib.sha256(b"medledger/test-vector/v1").hexdigest(), 16)


def vector_payload(public_key):
    return {
        "chain_id": "medledger-vector",
        "signer": pseudonym(public_key),
        "nonce": 1,
        "expires_at_ms": 1767225600000,
        "body": {"type": "register_patient", "public_key": b64url(public_key)},
    }


def main():
    command = sys.argv[1] if len(sys.argv) > 1 else "vector"
    if command == "vector":
        key = ec.derive_private_key(VECTOR_PRIVATE_KEY, ec.SECP256R1())
        public = public_key_sec1(key)
        tx, tx_id = sign(vector_payload(public), key)
        print(json.dumps({
            "public_key": b64url(public),
            "canonical": canonical(tx["payload"]),
            "tx_id": tx_id,
            "tx": tx,
        }, indent=2))
    elif command == "register-patient":
        chain_id = sys.argv[2]
        key = ec.generate_private_key(ec.SECP256R1())
        public = public_key_sec1(key)
        payload = {
            "chain_id": chain_id,
            "signer": pseudonym(public),
            "nonce": 1,
            "expires_at_ms": int(time.time() * 1000) + 60_000,
            "body": {"type": "register_patient", "public_key": b64url(public)},
        }
        tx, tx_id = sign(payload, key)
        print(json.dumps({"tx_id": tx_id, "tx": tx}))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
