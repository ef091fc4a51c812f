#!/usr/bin/env python3
"""Third-party checks of the agent's evidence, written from the specifications alone.

  evidence_check.py dsse ENVELOPE PUBLIC_KEY_HEX KEYID
      securesystemslib's DSSE Envelope.verify with an Ed25519 key: prints the verified
      in-toto Statement as JSON (exit 0), or "invalid: <reason>" (exit 1).

  evidence_check.py proof PROOF VERIFIER_KEY
      An inclusion proof of `aegis-agent log prove`, checked as README "Evidence" tells a
      third party to: the C2SP signed note (checkpoint) with the verifier key, the leaf hash
      (RFC 6962), the audit path (RFC 9162 2.1.3.2). Prints the entry (exit 0), or
      "invalid: <reason>" (exit 1).

Needs securesystemslib[crypto] (tests run it from the venv xtask makes).
"""

import base64
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def invalid(reason):
    print(f"invalid: {reason}")
    sys.exit(1)


def check_dsse(envelope_path, public_hex, keyid):
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey

    with open(envelope_path, encoding="utf-8") as f:
        envelope = Envelope.from_dict(json.load(f))
    key = SSlibKey(keyid, "ed25519", "ed25519", {"public": public_hex})
    try:
        envelope.verify([key], 1)
    except VerificationError as e:
        invalid(e)
    if envelope.payload_type != "application/vnd.in-toto+json":
        invalid(f"payload type {envelope.payload_type}")
    statement = json.loads(envelope.payload)
    if statement.get("_type") != "https://in-toto.io/Statement/v1":
        invalid("not an in-toto Statement v1")
    print(json.dumps(statement))


def open_note(note, vkey):
    """The text of a C2SP signed note signed by the verifier key name+id+base64(0x01||key)."""
    name, key_id, key_b64 = vkey.split("+", 2)
    typed = base64.b64decode(key_b64, validate=True)
    if typed[0] != 1 or len(typed) != 33:
        invalid("the verifier key is not an Ed25519 key")
    want_id = hashlib.sha256(name.encode() + b"\n" + typed).digest()[:4]
    if want_id.hex() != key_id:
        invalid("the verifier key's id does not match")
    key = Ed25519PublicKey.from_public_bytes(typed[1:])
    split = note.rindex("\n\n")
    text, signatures = note[: split + 1], note[split + 2 :]
    for line in signatures.splitlines():
        if not line.startswith("\u2014 "):
            invalid("a signature line does not start with an em dash")
        line_name, sig_b64 = line[2:].split(" ", 1)
        blob = base64.b64decode(sig_b64, validate=True)
        if line_name == name and blob[:4] == want_id:
            try:
                key.verify(blob[4:], text.encode())
            except InvalidSignature:
                invalid("the checkpoint's signature does not verify")
            return text
    invalid("the checkpoint is not signed by the key")


def node(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_inclusion(index, size, leaf, path):
    """RFC 9162 section 2.1.3.2."""
    if index >= size:
        invalid("the index is beyond the tree")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            invalid("the path is too long")
        if fn & 1 or fn == sn:
            r = node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        invalid("the path is too short")
    return r


def check_proof(proof_path, vkey):
    with open(proof_path, encoding="utf-8") as f:
        proof = json.load(f)
    text = open_note(proof["checkpoint"], vkey)
    lines = text.rstrip("\n").split("\n")
    origin, size, root = lines[0], int(lines[1]), base64.b64decode(lines[2], validate=True)
    if size != proof["tree_size"]:
        invalid("the tree size is not the checkpoint's")
    leaf = hashlib.sha256(b"\x00" + proof["entry"].encode("utf-8")).digest()
    if leaf.hex() != proof["leaf_hash"]:
        invalid("the entry does not hash to the leaf hash")
    entry = json.loads(proof["entry"])
    if entry["i"] != proof["index"]:
        invalid("the entry is not the proof's index")
    path = [bytes.fromhex(h) for h in proof["inclusion_path"]]
    if root_from_inclusion(proof["index"], size, leaf, path) != root:
        invalid("the path does not lead to the checkpoint's root")
    print(json.dumps({"origin": origin, "size": size, "entry": entry}))


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "dsse":
        check_dsse(*sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "proof":
        check_proof(*sys.argv[2:])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
