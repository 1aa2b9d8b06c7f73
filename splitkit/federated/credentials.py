"""Flower's side of a class's keys: TLS for the SuperLink and a key pair per SuperNode, made with `cryptography`
(a dependency of Flower's).

The trunk server's traffic is encrypted by CURVE (`splitkit.wire.keys`); Flower's, the LoRA that crosses the network
every round, by TLS. `make_flower_tls` makes a certificate authority and a SuperLink certificate for the teacher's
host in DIR/flower/; `add_supernode_key` gives a student an EC key pair for Flower's SuperNode authentication in
their own folder, with a copy of the authority's certificate. The teacher registers each public key with
`flwr supernode register`; a SuperLink started with `--enable-supernode-auth` lets in registered SuperNodes only.
"""

import datetime
import os
import shutil
from ipaddress import ip_address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAYS = 365  # a school year
CA, SUPERLINK = "ca", "superlink"  # DIR/flower/ca.crt, superlink.crt, superlink.key
NODE_KEY, NODE_PUBLIC, NODE_CA = "flower.key", "flower.pub", "flower-ca.crt"  # in DIR/students/NAME/


def make_flower_tls(folder, host: str) -> Path:
    """A certificate authority and a certificate for the SuperLink at `host` (an IP address or a name), signed by
    it, in DIR/flower/: ca.crt (give it to everyone), ca.key, superlink.crt and superlink.key (the teacher's
    alone). Refused if DIR/flower/ has them already: the students' copies of ca.crt would stop working."""
    out = Path(folder) / "flower"
    if (out / f"{CA}.crt").exists():
        raise ValueError(f"{out} has Flower's certificates already; delete the folder to make new ones (and give "
                         f"every student the new {CA}.crt)")
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "splitkit class CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        name = x509.IPAddress(ip_address(host))
    except ValueError:
        name = x509.DNSName(host)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=DAYS))
            .add_extension(x509.SubjectAlternativeName([name]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _secret(out / f"{CA}.key", _pem_key(ca_key))
    _secret(out / f"{SUPERLINK}.key", _pem_key(key))
    (out / f"{SUPERLINK}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{CA}.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return out


def add_supernode_key(folder, name: str) -> Path:
    """Student `name`'s SuperNode key pair in DIR/students/NAME/: flower.key (OpenSSH, theirs alone), flower.pub (to
    register) and flower-ca.crt, a copy of the authority's certificate that their SuperNode checks the SuperLink's
    against. Returns the public key's path."""
    folder, own = Path(folder), Path(folder) / "students" / name
    ca = folder / "flower" / f"{CA}.crt"
    if not ca.is_file():
        raise ValueError(f"no Flower certificates in {folder / 'flower'}: make them first, with `python -m splitkit "
                         f"keys {folder} --flower-host HOST`")
    own.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())  # a NIST curve, as Flower's SuperNode authentication asks
    _secret(own / NODE_KEY, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public = own / NODE_PUBLIC
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    shutil.copyfile(ca, own / NODE_CA)
    return public


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _secret(path: Path, data: bytes):
    """Write a private key readable by its owner alone."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
