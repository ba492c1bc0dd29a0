//! Client TLS: TLS 1.3 only, the fleet CA pinned by the SHA-256 of its DER, the fleet name checked.
//!
//! The fleet sends its chain (leaf, CA). [`PinnedCaVerifier`] takes the CA from that chain only if
//! its SHA-256 equals the pin, then verifies the leaf against it with webpki for the configured
//! server name, so no platform roots are ever trusted and an IP address needs no IP SAN.

use std::fmt;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The pin is not 64 hex digits.
    #[error("CA pin {pin:?} is not a SHA-256 in hex (64 hex digits)")]
    BadPin {
        /// The pin as given.
        pin: String,
    },
    /// A PEM certificate could not be read.
    #[error("cannot read the {what} certificate (PEM)")]
    BadCert {
        /// Which certificate.
        what: &'static str,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM key could not be read.
    #[error("cannot read the {what} private key (PEM)")]
    BadKey {
        /// Which key.
        what: &'static str,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration refused")]
    Rustls(#[from] rustls::Error),
    /// The server name is not a valid DNS name or IP address.
    #[error("server name {name:?} is not a DNS name or IP address")]
    BadServerName {
        /// The name as given.
        name: String,
    },
}

/// The crypto provider used everywhere: ring's, with aws-lc-rs's TLS 1.3 cipher suites.
///
/// The records' AES-GCM is aws-lc-rs's: on the benchmark machine it seals about 15 % faster than
/// ring's, and the tunnel moves a byte with about 4 % less CPU (`docs/benchmarks.md`,
/// "bench/aead" and "bench/tunnel"). Everything else is ring's: key exchange (X25519 first, as
/// before; aws-lc-rs's own defaults would put the larger post-quantum hybrid first), signatures
/// and certificate checks, keys and randomness. With aws-lc-rs's whole provider, fresh TLS
/// connections per second fell by about 12 % (`bench/enroll`'s baseline).
pub fn provider() -> Arc<CryptoProvider> {
    let aws_lc = rustls::crypto::aws_lc_rs::default_provider();
    Arc::new(CryptoProvider {
        cipher_suites: aws_lc.cipher_suites,
        ..rustls::crypto::ring::default_provider()
    })
}

/// SHA-256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The pin of a PEM CA certificate: the SHA-256 of its DER.
pub fn pin_of_pem(ca_pem: &str) -> Result<String, TlsError> {
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|source| TlsError::BadCert { what: "CA", source })?;
    Ok(sha256_hex(&der))
}

/// Parse every certificate in a PEM bundle.
pub fn certs_from_pem(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|source| TlsError::BadCert { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::BadCert {
            what,
            source: rustls::pki_types::pem::Error::NoItemsFound,
        });
    }
    Ok(certs)
}

/// Parse a PEM private key.
pub fn key_from_pem(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|source| TlsError::BadKey { what, source })
}

/// A server name from text (DNS name or IP address).
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string())
        .map_err(|_| TlsError::BadServerName { name: name.to_string() })
}

/// Verifies the fleet against a CA pinned by SHA-256.
pub struct PinnedCaVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for PinnedCaVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedCaVerifier").field("pin", &sha256_hex_raw(&self.pin)).finish()
    }
}

fn sha256_hex_raw(b: &[u8; 32]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_pin(pin: &str) -> Result<[u8; 32], TlsError> {
    let bad = || TlsError::BadPin { pin: pin.to_string() };
    let pin = pin.trim().to_ascii_lowercase();
    if pin.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let hex = pin.get(2 * i..2 * i + 2).ok_or_else(bad)?;
        *o = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

impl PinnedCaVerifier {
    /// A verifier for the CA whose DER hashes to `pin` (64 hex digits).
    pub fn new(pin: &str) -> Result<Self, TlsError> {
        Ok(Self { pin: parse_pin(pin)?, provider: provider() })
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref()).as_slice() == self.pin)
            .ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("pinned CA unusable: {e}")))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A client certificate and key, PEM.
#[derive(Clone)]
pub struct ClientIdentity {
    /// Certificate chain (PEM).
    pub cert_pem: String,
    /// Private key (PEM).
    pub key_pem: String,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity").field("key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

/// A TLS 1.3 client config trusting only the pinned CA, presenting `identity` if given, offering
/// `alpn`.
pub fn client_config(
    pin: &str,
    identity: Option<&ClientIdentity>,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_alpns(pin, identity, &[alpn])
}

/// [`client_config`] offering several ALPN ids, most preferred first (the server picks).
pub fn client_config_alpns(
    pin: &str,
    identity: Option<&ClientIdentity>,
    alpns: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = Arc::new(PinnedCaVerifier::new(pin)?);
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(
            certs_from_pem(&id.cert_pem, "client")?,
            key_from_pem(&id.key_pem, "client")?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_must_be_sha256_hex() {
        assert!(PinnedCaVerifier::new(&"ab".repeat(32)).is_ok());
        assert!(PinnedCaVerifier::new(&"AB".repeat(32)).is_ok());
        assert!(matches!(PinnedCaVerifier::new("abc"), Err(TlsError::BadPin { .. })));
        assert!(matches!(PinnedCaVerifier::new(&"zz".repeat(32)), Err(TlsError::BadPin { .. })));
    }

    #[test]
    fn the_provider_takes_only_the_cipher_suites_from_aws_lc_rs() {
        let ours = provider();
        let suites =
            |p: &CryptoProvider| p.cipher_suites.iter().map(|s| s.suite()).collect::<Vec<_>>();
        let groups = |p: &CryptoProvider| p.kx_groups.iter().map(|g| g.name()).collect::<Vec<_>>();
        let aws_lc = rustls::crypto::aws_lc_rs::default_provider();
        let ring = rustls::crypto::ring::default_provider();
        assert_eq!(suites(&ours), suites(&aws_lc));
        // The same suites by name would also be ring's: check the TLS 1.3 ones (the only ones
        // Hearth's configs allow) are aws-lc-rs's own.
        let tls13 = |p: &CryptoProvider| {
            p.cipher_suites
                .iter()
                .filter_map(|s| s.tls13().map(|s| s as *const rustls::Tls13CipherSuite))
                .collect::<Vec<_>>()
        };
        assert_eq!(tls13(&ours).len(), 3);
        assert_eq!(tls13(&ours), tls13(&aws_lc));
        assert!(tls13(&ours).iter().all(|s| !tls13(&ring).contains(s)));
        assert_eq!(
            suites(&ours).first(),
            Some(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384),
            "AES-256-GCM stays the first TLS 1.3 suite"
        );
        // Key exchange as before the switch: ring's groups, X25519 first (one key share).
        assert_eq!(groups(&ours), groups(&ring));
        assert_eq!(groups(&ours).first(), Some(&rustls::NamedGroup::X25519));
        assert_eq!(
            ours.signature_verification_algorithms.all.len(),
            ring.signature_verification_algorithms.all.len()
        );
    }

    #[test]
    fn sha256_hex_matches_a_known_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
