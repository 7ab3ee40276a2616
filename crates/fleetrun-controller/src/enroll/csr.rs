//! What a certificate signing request may ask for. The controller chooses every name and
//! extension of the certificates it issues, so a request that asks for anything else (a
//! subjectAltName other than the agent URI its key gets, a CA, a usage beyond client
//! authentication, an attribute) is refused with the reason rather than silently signed without
//! it: a client that asks for more than it gets is misconfigured, or probing. The request's
//! subject DN is accepted and ignored: the certificate's subject is the controller's choice (the
//! agent id as common name).
//!
//! The keys accepted are the ones rustls verifies and `fleetrun-agent` makes (ECDSA P-256):
//! ECDSA on P-256 or P-384, Ed25519, and RSA of 2048 to 8192 bits; the request's signature must
//! verify with its own key and use SHA-256 or stronger. The key must be what its
//! AlgorithmIdentifier says (an uncompressed point of the named curve, 32 bytes for Ed25519, NULL
//! parameters for RSA) and be signed with the algorithm its certificate will name (P-256 with
//! SHA-256, P-384 with SHA-384): the certificate carries the request's SubjectPublicKeyInfo byte
//! for byte ([`super::ca::requested_key`] refuses otherwise), since the agent's identity is that
//! SubjectPublicKeyInfo's fingerprint.

use x509_parser::{
    certification_request::X509CertificationRequest,
    cri_attributes::ParsedCriAttribute,
    extensions::{GeneralName, ParsedExtension},
    oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
        OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
        OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
    },
    prelude::FromDer as _,
    public_key::PublicKey,
};

/// The smallest and largest RSA moduli accepted, in bits.
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

/// How to make an acceptable request, appended to refusals.
const MAKE_IT: &str = "make the request with `fleetrun-agent enroll`, which asks for nothing \
                       the controller does not give";

/// Checks `der` against what the controller signs; `agent_uri` is the name of the agent the
/// request's key would be (the only name a request may carry). Returns the SubjectPublicKeyInfo's
/// DER on success.
pub fn check(der: &[u8], agent_uri: impl Fn(&[u8]) -> String) -> Result<Vec<u8>, String> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| format!("the certificate signing request is not usable ({e}): {MAKE_IT}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "the certificate signing request has {} bytes after its end: {MAKE_IT}",
            rest.len()
        ));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let signed_with = &csr.signature_algorithm.algorithm;
    if ![
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_SIG_ED25519,
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
    ]
    .contains(signed_with)
    {
        return Err(format!(
            "the certificate signing request is signed with algorithm {signed_with}, which is \
             not accepted (ECDSA with SHA-256 or SHA-384, Ed25519, RSA PKCS#1 with SHA-256 or \
             stronger): {MAKE_IT}"
        ));
    }
    check_key(spki, signed_with)?;
    csr.verify_signature().map_err(|e| {
        format!(
            "the certificate signing request's signature does not verify with its key ({e}): \
             it was altered or not signed by the key it carries"
        )
    })?;
    let uri = agent_uri(spki.raw);
    for attribute in info.iter_attributes() {
        match attribute.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(requested) => {
                for extension in &requested.extensions {
                    check_extension(extension.parsed_extension(), &extension.oid, &uri)?;
                }
            }
            ParsedCriAttribute::ChallengePassword(_) => {
                return Err(format!(
                    "the certificate signing request carries a challenge password, which the \
                     controller does not use (the join token authenticates): {MAKE_IT}"
                ));
            }
            ParsedCriAttribute::UnsupportedAttribute => {
                return Err(format!(
                    "the certificate signing request carries attribute {}, which the controller \
                     does not use: {MAKE_IT}",
                    attribute.oid
                ));
            }
        }
    }
    Ok(spki.raw.to_vec())
}

/// The key must be of an accepted type, be what its type says (an Ed25519 key of 32 bytes, an
/// uncompressed point of its curve, an RSA key with the NULL parameters RFC 3279 requires), and
/// be signed with the algorithm the certificate will name for it: the certificate is built from
/// the key and that algorithm, and must carry the very SubjectPublicKeyInfo the agent's identity
/// is the fingerprint of.
fn check_key(
    spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>,
    signed_with: &x509_parser::oid_registry::Oid<'_>,
) -> Result<(), String> {
    let algorithm = &spki.algorithm.algorithm;
    let parameters = spki.algorithm.parameters.as_ref();
    let key = &spki.subject_public_key.data;
    let accepted = "accepted: ECDSA P-256 (what fleetrun-agent makes) or P-384, Ed25519, RSA of \
                    2048 to 8192 bits";
    let signed = |expected: &[&x509_parser::oid_registry::Oid<'_>], what: &str| {
        if expected.contains(&signed_with) {
            Ok(())
        } else {
            Err(format!(
                "the request's key is {what} but the request is signed with algorithm \
                 {signed_with}: {what} keys sign with {}; {MAKE_IT}",
                expected
                    .iter()
                    .map(|oid| oid.to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ))
        }
    };
    if *algorithm == OID_SIG_ED25519 {
        if parameters.is_some() || key.len() != 32 {
            return Err(format!(
                "the request's key says Ed25519 but is not an Ed25519 key (32 bytes, no \
                 parameters): {MAKE_IT}"
            ));
        }
        return signed(&[&OID_SIG_ED25519], "Ed25519");
    }
    if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = parameters.and_then(|p| p.as_oid().ok());
        // An uncompressed point: 4, then both coordinates.
        let (point_len, hash, what) = match curve {
            Some(curve) if curve == OID_EC_P256 => (65, OID_SIG_ECDSA_WITH_SHA256, "ECDSA P-256"),
            Some(curve) if curve == OID_NIST_EC_P384 => {
                (97, OID_SIG_ECDSA_WITH_SHA384, "ECDSA P-384")
            }
            Some(curve) => {
                return Err(format!(
                    "the request's key is on elliptic curve {curve}, which is not accepted \
                     ({accepted})"
                ));
            }
            None => {
                return Err(format!(
                    "the request's elliptic-curve key names no curve ({accepted})"
                ));
            }
        };
        if key.len() != point_len || key.first() != Some(&4) {
            return Err(format!(
                "the request's key says {what} but is not an uncompressed point of that curve \
                 ({point_len} bytes beginning with 4): {MAKE_IT}"
            ));
        }
        return signed(&[&hash], what);
    }
    if *algorithm == OID_PKCS1_RSAENCRYPTION {
        if !parameters.is_some_and(|p| p.header.tag() == x509_parser::asn1_rs::Tag::Null) {
            return Err(format!(
                "the request's RSA key has no NULL parameters (RFC 3279 requires them): \
                 {MAKE_IT}"
            ));
        }
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err("the request's RSA key does not parse".into());
        };
        // The modulus without the sign byte DER may put before it.
        let modulus = match rsa.modulus {
            [0, rest @ ..] => rest,
            all => all,
        };
        let bits = modulus
            .first()
            .map_or(0, |top| modulus.len() * 8 - top.leading_zeros() as usize);
        if !RSA_BITS.contains(&bits) {
            return Err(format!(
                "the request's key is RSA of {bits} bits, which is not accepted ({accepted})"
            ));
        }
        return signed(
            &[
                &OID_PKCS1_SHA256WITHRSA,
                &OID_PKCS1_SHA384WITHRSA,
                &OID_PKCS1_SHA512WITHRSA,
            ],
            "RSA",
        );
    }
    Err(format!(
        "the request's key is of type {algorithm}, which is not accepted ({accepted})"
    ))
}

fn check_extension(
    extension: &ParsedExtension<'_>,
    oid: &x509_parser::oid_registry::Oid<'_>,
    agent_uri: &str,
) -> Result<(), String> {
    match extension {
        ParsedExtension::SubjectAlternativeName(san) => {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) if *uri == agent_uri => {}
                    other => {
                        return Err(format!(
                            "the certificate signing request asks for the name {}: the \
                             controller names the agent ({agent_uri} for this key) and gives no \
                             other name; {MAKE_IT}",
                            describe(other)
                        ));
                    }
                }
            }
            Ok(())
        }
        ParsedExtension::BasicConstraints(constraints) if constraints.ca => Err(format!(
            "the certificate signing request asks to be a CA (basicConstraints CA:TRUE): an \
             agent's certificate signs no other; {MAKE_IT}"
        )),
        ParsedExtension::BasicConstraints(_) => Ok(()),
        ParsedExtension::KeyUsage(usage) if usage.flags & !1 != 0 => Err(format!(
            "the certificate signing request asks for key usage {usage}: an agent's certificate \
             is for digital signatures only; {MAKE_IT}"
        )),
        ParsedExtension::KeyUsage(_) => Ok(()),
        ParsedExtension::ExtendedKeyUsage(usage)
            if usage.any
                || usage.server_auth
                || usage.code_signing
                || usage.email_protection
                || usage.time_stamping
                || usage.ocsp_signing
                || !usage.other.is_empty() =>
        {
            Err(format!(
                "the certificate signing request asks for extended key usages beyond client \
                 authentication: an agent's certificate authenticates the agent only; {MAKE_IT}"
            ))
        }
        ParsedExtension::ExtendedKeyUsage(_) => Ok(()),
        _ => Err(format!(
            "the certificate signing request asks for extension {oid}, which the controller does \
             not give: it sets every extension of an agent's certificate; {MAKE_IT}"
        )),
    }
}

/// A name as the refusal shows it: its type and value.
fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => format!("URI {uri:?}"),
        GeneralName::DNSName(dns) => format!("DNS {dns:?}"),
        GeneralName::RFC822Name(mail) => format!("email {mail:?}"),
        GeneralName::IPAddress(bytes) => match <[u8; 4]>::try_from(*bytes) {
            Ok(v4) => format!("IP {}", std::net::Ipv4Addr::from(v4)),
            Err(_) => match <[u8; 16]>::try_from(*bytes) {
                Ok(v6) => format!("IP {}", std::net::Ipv6Addr::from(v6)),
                Err(_) => format!("IP of {} bytes", bytes.len()),
            },
        },
        GeneralName::OtherName(oid, _) => format!("otherName {oid}"),
        GeneralName::DirectoryName(dn) => format!("directory name {:?}", dn.to_string()),
        GeneralName::RegisteredID(oid) => format!("registered ID {oid}"),
        GeneralName::X400Address(_) => "X.400 address".into(),
        GeneralName::EDIPartyName(_) => "EDI party name".into(),
        GeneralName::Invalid(..) => "of an invalid encoding".into(),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType,
    };

    use super::*;

    const OURS: &str = "spiffe://fleetrun/agent/host-ours";

    fn check_ours(der: &[u8]) -> Result<Vec<u8>, String> {
        check(der, |_| OURS.to_owned())
    }

    fn request(edit: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        edit(&mut params);
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    fn refused(der: &[u8], says: &str) {
        let reason = check_ours(der).expect_err("accepted");
        assert!(reason.contains(says), "expected {says:?} in: {reason}");
    }

    /// DER: a tag, a length and the content.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match content.len() {
            n @ 0..0x80 => out.push(n as u8),
            n @ 0x80..0x100 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(content);
        out
    }

    fn seq(parts: &[&[u8]]) -> Vec<u8> {
        tlv(0x30, &parts.concat())
    }

    const RSA_ENCRYPTION: &[u8] = &[6, 9, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 1, 1, 1];
    const SHA256_WITH_RSA: &[u8] = &[6, 9, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 1, 1, 11];
    const EC_PUBLIC_KEY: &[u8] = &[6, 7, 0x2a, 0x86, 0x48, 0xce, 0x3d, 2, 1];
    const ECDSA_WITH_SHA256: &[u8] = &[6, 8, 0x2a, 0x86, 0x48, 0xce, 0x3d, 4, 3, 2];
    const ECDSA_WITH_SHA1: &[u8] = &[6, 7, 0x2a, 0x86, 0x48, 0xce, 0x3d, 4, 1];
    const P192: &[u8] = &[6, 8, 0x2a, 0x86, 0x48, 0xce, 0x3d, 3, 1, 1];
    const SECP256K1: &[u8] = &[6, 5, 0x2b, 0x81, 4, 0, 10];
    const DSA: &[u8] = &[6, 7, 0x2a, 0x86, 0x48, 0xce, 0x38, 4, 1];
    const NULL: &[u8] = &[5, 0];

    /// A request over `spki`, "signed" with `algorithm` by a signature of zeros: the key and
    /// algorithm checks come before the signature's.
    fn hand_made(spki: &[u8], algorithm: &[u8]) -> Vec<u8> {
        let info = seq(&[&[2, 1, 0], &seq(&[]), spki, &[0xa0, 0]]);
        seq(&[&info, &seq(&[algorithm]), &tlv(3, &[0; 65])])
    }

    fn rsa_spki(bits: usize) -> Vec<u8> {
        let mut modulus = vec![0u8];
        modulus.push(0xc5);
        modulus.resize(bits / 8 + 1, 0x5a);
        let key = seq(&[&tlv(2, &modulus), &tlv(2, &[1, 0, 1])]);
        let mut bit_string = vec![0u8];
        bit_string.extend(key);
        seq(&[&seq(&[RSA_ENCRYPTION, NULL]), &tlv(3, &bit_string)])
    }

    fn ec_spki(curve: &[u8], point_len: usize) -> Vec<u8> {
        let mut point = vec![0u8, 4];
        point.resize(point_len + 2, 7);
        seq(&[&seq(&[EC_PUBLIC_KEY, curve]), &tlv(3, &point)])
    }

    #[test]
    fn a_plain_request_and_one_naming_only_its_own_agent_are_accepted() {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let der = params.serialize_request(&key).unwrap().der().to_vec();
        assert_eq!(check_ours(&der).unwrap(), key.subject_public_key_info());
        let named = request(|p| {
            p.subject_alt_names
                .push(SanType::URI(OURS.try_into().unwrap()));
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        });
        check_ours(&named).unwrap();
        // The keys rcgen makes besides the agent's default.
        for algorithm in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let key = KeyPair::generate_for(algorithm).unwrap();
            let der = params.serialize_request(&key).unwrap().der().to_vec();
            check_ours(&der).unwrap();
        }
    }

    #[test]
    fn names_other_than_the_agents_own_are_refused_naming_them() {
        let cases: Vec<(SanType, &str)> = vec![
            (
                SanType::URI("spiffe://fleetrun/agent/agent-1".try_into().unwrap()),
                "URI \"spiffe://fleetrun/agent/agent-1\"",
            ),
            (
                SanType::DnsName("controller.example".try_into().unwrap()),
                "DNS \"controller.example\"",
            ),
            (
                SanType::IpAddress("10.9.9.9".parse().unwrap()),
                "IP 10.9.9.9",
            ),
            (
                SanType::IpAddress("2001:db8::1".parse().unwrap()),
                "IP 2001:db8::1",
            ),
            (
                SanType::Rfc822Name("root@example.com".try_into().unwrap()),
                "email \"root@example.com\"",
            ),
            (
                SanType::OtherName((vec![1, 3, 6, 1, 4, 1, 311, 20, 2, 3], "admin@corp".into())),
                "otherName 1.3.6.1.4.1.311.20.2.3",
            ),
        ];
        for (name, says) in cases {
            let der = request(|p| {
                p.subject_alt_names
                    .push(SanType::URI(OURS.try_into().unwrap()));
                p.subject_alt_names.push(name);
            });
            refused(&der, says);
            refused(&der, "the controller names the agent");
        }
    }

    #[test]
    fn a_ca_extra_usages_extensions_and_attributes_are_refused() {
        refused(
            &request(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
            "asks to be a CA",
        );
        refused(
            &request(|p| p.key_usages = vec![KeyUsagePurpose::KeyCertSign]),
            "key usage",
        );
        refused(
            &request(|p| {
                p.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ClientAuth,
                    ExtendedKeyUsagePurpose::ServerAuth,
                ]
            }),
            "beyond client authentication",
        );
        refused(
            &request(|p| {
                p.custom_extensions.push(CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 4, 1, 99999, 1],
                    vec![5, 0],
                ))
            }),
            "extension 1.3.6.1.4.1.99999.1",
        );
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(Vec::<String>::new()).unwrap();
        // challengePassword and unstructuredName, each a SET of one UTF8String.
        for (oid, says) in [
            (&[1, 2, 840, 113549, 1, 9, 7][..], "challenge password"),
            (
                &[1, 2, 840, 113549, 1, 9, 2][..],
                "attribute 1.2.840.113549.1.9.2",
            ),
        ] {
            let with_attribute = params
                .serialize_request_with_attributes(
                    &key,
                    vec![rcgen::Attribute {
                        oid,
                        values: vec![0x31, 5, 0x0c, 3, b'p', b'w', b'd'],
                    }],
                )
                .unwrap();
            refused(with_attribute.der(), says);
        }
    }

    #[test]
    fn weak_keys_and_algorithms_are_refused_before_anything_is_signed() {
        refused(
            &hand_made(&rsa_spki(1024), SHA256_WITH_RSA),
            "RSA of 1024 bits",
        );
        refused(
            &hand_made(&ec_spki(P192, 48), ECDSA_WITH_SHA256),
            "1.2.840.10045.3.1.1",
        );
        refused(
            &hand_made(&ec_spki(SECP256K1, 64), ECDSA_WITH_SHA256),
            "1.3.132.0.10",
        );
        let dsa = seq(&[&seq(&[DSA]), &tlv(3, &[0, 2, 1, 5])]);
        refused(
            &hand_made(&dsa, SHA256_WITH_RSA),
            "of type 1.2.840.10040.4.1",
        );
        // A good key with SHA-1, and one whose signature is not its key's.
        let key = KeyPair::generate().unwrap();
        refused(
            &hand_made(&key.subject_public_key_info(), ECDSA_WITH_SHA1),
            "algorithm 1.2.840.10045.4.1",
        );
        refused(
            &hand_made(&key.subject_public_key_info(), ECDSA_WITH_SHA256),
            "does not verify",
        );
        // An RSA key of 2048 bits passes the key check (and fails on its made-up signature).
        refused(
            &hand_made(&rsa_spki(2048), SHA256_WITH_RSA),
            "does not verify",
        );
        let mut trailing = request(|_| {});
        trailing.push(0);
        refused(&trailing, "after its end");
        refused(b"not a csr", "not usable");
    }

    /// Test keys and requests made once with openssl: a request whose key is P-384 but signed
    /// with ecdsa-with-SHA256, one whose key is P-256 signed with ecdsa-with-SHA384, and an RSA
    /// key (PKCS#1) that signs the requests below.
    const P384_SIGNED_SHA256: &[u8] = include_bytes!("testdata/p384-signed-sha256.csr.der");
    const P256_SIGNED_SHA384: &[u8] = include_bytes!("testdata/p256-signed-sha384.csr.der");
    const RSA_2048: &[u8] = include_bytes!("testdata/rsa2048.pkcs1.der");
    const ED25519: &[u8] = &[6, 3, 0x2b, 101, 112];

    /// A request over `spki` signed with sha256WithRSAEncryption by the test RSA key, whatever
    /// `spki` says it is.
    fn signed_by_rsa(spki: &[u8]) -> Vec<u8> {
        use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
        let key = RsaKeyPair::from_der(RSA_2048).unwrap();
        let info = seq(&[&[2, 1, 0], &seq(&[]), spki, &[0xa0, 0]]);
        let mut signature = vec![0; key.public().modulus_len()];
        key.sign(
            &RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            &info,
            &mut signature,
        )
        .unwrap();
        let mut bits = vec![0];
        bits.extend(signature);
        seq(&[&info, &seq(&[SHA256_WITH_RSA, NULL]), &tlv(3, &bits)])
    }

    /// The test RSA key's SubjectPublicKeyInfo with `algorithm` as its AlgorithmIdentifier.
    fn rsa_key_as(algorithm: &[&[u8]]) -> Vec<u8> {
        use ring::signature::{KeyPair as _, RsaKeyPair};
        let key = RsaKeyPair::from_der(RSA_2048).unwrap();
        let mut bits = vec![0];
        bits.extend_from_slice(key.public_key().as_ref());
        seq(&[&seq(algorithm), &tlv(3, &bits)])
    }

    fn key_refused(der: &[u8], says: &str) {
        let reason = super::super::ca::requested_key(der).expect_err("accepted");
        assert!(reason.contains(says), "expected {says:?} in: {reason}");
    }

    /// The certificate is made from the request's key and its signature algorithm; a request
    /// whose key says another type than its signature (or is written otherwise than the
    /// certificate would write it) would get a certificate over another SubjectPublicKeyInfo than
    /// the one its agent id and enrolled fingerprint come from. Each such request verifies.
    #[test]
    fn a_key_the_certificate_would_not_carry_as_requested_is_refused() {
        // A P-384 key signed with SHA-256: the certificate would claim P-256 over a P-384 point.
        key_refused(
            P384_SIGNED_SHA256,
            "signed with algorithm 1.2.840.10045.4.3.2",
        );
        key_refused(
            P256_SIGNED_SHA384,
            "signed with algorithm 1.2.840.10045.4.3.3",
        );
        // An RSA key without the NULL parameters: the certificate's key would hash otherwise.
        key_refused(
            &signed_by_rsa(&rsa_key_as(&[RSA_ENCRYPTION])),
            "no NULL parameters",
        );
        // An RSA key labelled Ed25519: the same RSA key would enroll as another agent.
        key_refused(
            &signed_by_rsa(&rsa_key_as(&[ED25519])),
            "says Ed25519 but is not an Ed25519 key",
        );
        // The same key written as RFC 3279 says is accepted, and is the certificate's key.
        let spki = rsa_key_as(&[RSA_ENCRYPTION, NULL]);
        let key = super::super::ca::requested_key(&signed_by_rsa(&spki)).unwrap();
        assert_eq!(key.sha256, super::super::ca::spki_sha256(&spki));
    }
}
