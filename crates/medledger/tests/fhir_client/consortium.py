"""A standard FHIR client (fhirpy) against a running three-node medledger consortium.

Run by tests/fhir_client.rs with the path of the demo's `fhir-demo.json` and the medledger
binary. It logs in with passwords and one-time codes, creates a patient and observations
at hospital-a, searches and pages them, reads them from hospital-b once the patient
consents, and sees them disappear when the consent is revoked. Every step asserts.
"""

import base64
import hashlib
import hmac
import json
import os
import struct
import subprocess
import sys
import time

import requests
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import ForbiddenError, ResourceNotFound

OBSERVATIONS = 25
LOINC = "http://loinc.org"


def totp(secret_b32, at=None):
    """RFC 6238 (SHA-1, 30 s, 6 digits), as an authenticator app computes it."""
    key = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    step = int((time.time() if at is None else at) // 30)
    digest = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    code = (struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF) % 1_000_000
    return f"{code:06d}"


def login(node, username, password, secret, scope):
    """A login; a one-time code is good once, so if this one was just used (the demo logs
    in as dr-alice itself), wait for the next one, as a person would."""
    for attempt in range(2):
        answer = requests.post(
            f"{node}/auth/token",
            data={
                "grant_type": "password",
                "username": username,
                "password": password,
                "totp": totp(secret),
                "scope": scope,
            },
            timeout=30,
        )
        if answer.status_code == 200 or attempt == 1:
            break
        time.sleep(30 - time.time() % 30 + 0.5)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "Bearer"
    return body["access_token"]


def client(base, token):
    return SyncFHIRClient(base, authorization=f"Bearer {token}")


def search_all(fhir, resource_type, **params):
    """Every match, following the server's next links page by page."""
    return fhir.resources(resource_type).search(**params).limit(10).fetch_all()


def main():
    demo = json.load(open(sys.argv[1]))
    medledger = sys.argv[2]
    password = open(demo["password_file"]).read().strip()
    nodes = {n["org"]: n for n in demo["nodes"]}
    accounts = {a["username"]: a for a in demo["accounts"]}
    a_base = nodes["hospital-a"]["fhir_base"]
    b_base = nodes["hospital-b"]["fhir_base"]

    # The server says what it supports, without a token.
    metadata = requests.get(f"{a_base}/metadata", timeout=30).json()
    assert metadata["resourceType"] == "CapabilityStatement"
    assert metadata["fhirVersion"] == "4.0.1"
    smart = requests.get(f"{a_base}/.well-known/smart-configuration", timeout=30).json()
    assert smart["token_endpoint"].endswith("/auth/token")

    # No token, no data.
    assert requests.get(f"{a_base}/Observation?patient=x", timeout=30).status_code == 401

    alice = accounts["dr-alice@hospital-a"]
    alice_fhir = client(
        a_base, login(alice["node"], alice["username"], password, alice["totp_secret"], "user/*.cruds")
    )

    # A patient registered through FHIR: the id is the ledger pseudonym.
    patient = alice_fhir.resource(
        "Patient",
        name=[{"family": "Clientson", "given": ["Synthia"]}],
        gender="female",
        birthDate="1979-05-04",
    )
    patient.save()
    pid = patient.id
    assert pid.startswith("pt-"), pid

    created = []
    for i in range(OBSERVATIONS):
        code = "8867-4" if i % 2 == 0 else "8480-6"
        observation = alice_fhir.resource(
            "Observation",
            status="final",
            code={"coding": [{"system": LOINC, "code": code}]},
            subject={"reference": f"Patient/{pid}"},
            effectiveDateTime=f"2025-03-{1 + i:02d}T10:00:00Z",
            valueQuantity={"value": 60 + i, "unit": "/min"},
        )
        observation.save()
        assert observation.id.startswith("hospital-a."), observation.id
        assert observation["meta"]["versionId"] == "1"
        created.append(observation.id)

    # Search and page at the custodian.
    found = search_all(alice_fhir, "Observation", patient=pid)
    assert sorted(o.id for o in found) == sorted(created), (len(found), len(created))
    first_page = alice_fhir.resources("Observation").search(patient=pid).limit(10).fetch_raw()
    assert first_page["total"] == OBSERVATIONS
    assert len(first_page["entry"]) == 10
    assert any(link["relation"] == "next" for link in first_page["link"])
    heart = search_all(alice_fhir, "Observation", patient=pid, code=f"{LOINC}|8867-4")
    assert len(heart) == (OBSERVATIONS + 1) // 2, len(heart)
    later = search_all(alice_fhir, "Observation", patient=pid, date="ge2025-03-20")
    assert len(later) == OBSERVATIONS - 19, len(later)

    # An update makes version 2; the old version stays readable.
    first = alice_fhir.reference("Observation", created[0]).to_resource()
    first["status"] = "amended"
    first.save()
    assert first["meta"]["versionId"] == "2"
    old = requests.get(
        f"{a_base}/Observation/{created[0]}/_history/1",
        headers={"Authorization": alice_fhir.authorization},
        timeout=30,
    ).json()
    assert old["status"] == "final"

    # hospital-b's clinician: nothing without a consent.
    bob = accounts["dr-bob@hospital-b"]
    bob_fhir = client(
        b_base, login(bob["node"], bob["username"], password, bob["totp_secret"], "user/*.rs")
    )
    assert search_all(bob_fhir, "Observation", patient=pid) == []
    try:
        bob_fhir.reference("Observation", created[1]).to_resource()
        raise AssertionError("read without consent succeeded")
    except ForbiddenError as refused:
        assert "access_denied" in str(refused), refused
    except ResourceNotFound:
        raise AssertionError("a denied read must say it was denied (403), not 404")

    # The patient logs in at hospital-a (an account made for the key file the node keeps)
    # and consents to dr-bob reading their observations.
    key_file = os.path.join(
        os.path.dirname(demo["password_file"]), "..", "nodes", "hospital-a", "patients", f"{pid}.json"
    )
    made = subprocess.run(
        [
            medledger, "account", "add",
            "--data-dir", os.path.join(os.path.dirname(demo["password_file"]), "..", "nodes", "hospital-a"),
            "--identity", key_file,
            "--password-file", demo["password_file"],
        ],
        capture_output=True, text=True, check=True,
    ).stdout
    secret = made.split("secret (shown once): ")[1].split()[0]
    patient_fhir = client(
        a_base,
        login(nodes["hospital-a"]["api"], pid, password, secret, "patient/*.rs patient/Consent.cruds"),
    )
    consent = patient_fhir.resource(
        "Consent",
        status="active",
        scope={"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        category=[{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        patient={"reference": f"Patient/{pid}"},
        provision={
            "type": "permit",
            "actor": [{
                "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
                "reference": {"reference": "Practitioner/hospital-b.dr-bob"},
            }],
            "action": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "access"}]}],
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}],
            "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}],
        },
    )
    consent.save()
    assert consent["status"] == "active"

    # Now hospital-b reads them across the consortium.
    seen = search_all(bob_fhir, "Observation", patient=pid)
    assert sorted(o.id for o in seen) == sorted(created), len(seen)
    one = bob_fhir.reference("Observation", created[3]).to_resource()
    assert one["subject"]["reference"] == f"Patient/{pid}"

    # The patient sees the accesses in their audit trail, each with its proof.
    trail = patient_fhir.resources("AuditEvent").search(patient=pid).fetch_raw()
    assert trail["total"] > 0
    assert any(e["resource"]["outcome"] == "4" for e in trail["entry"]), "the denials are there"
    assert all(
        any(x["url"].endswith("inclusion-proof") for x in e["resource"]["extension"])
        for e in trail["entry"]
    )

    # Revoked: the observations disappear for hospital-b.
    consent["status"] = "inactive"
    consent.save()
    assert search_all(bob_fhir, "Observation", patient=pid) == []
    try:
        bob_fhir.reference("Observation", created[3]).to_resource()
        raise AssertionError("read after revoke succeeded")
    except ForbiddenError as refused:
        assert "access_denied" in str(refused), refused
    print(f"fhirpy: {OBSERVATIONS} observations created, paged, shared under consent and withdrawn")


if __name__ == "__main__":
    main()
