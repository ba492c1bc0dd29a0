//! Key pairs and certificate signing requests. The node's key is generated on the node and never
//! leaves it: only a CSR (which proves possession by its signature) is sent.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

/// Why a key or CSR could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// rcgen failed.
    #[error("{what}")]
    Rcgen {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
}

/// A new ECDSA P-256 key pair, as PKCS#8 PEM.
pub fn generate_key_pem() -> Result<String, IdentityError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map(|k| k.serialize_pem())
        .map_err(|source| IdentityError::Rcgen { what: "cannot generate a key pair", source })
}

/// A CSR (PEM) for the key in `key_pem`, with `common_name` as its subject (the fleet replaces
/// every field but the key).
pub fn csr_pem(key_pem: &str, common_name: &str) -> Result<String, IdentityError> {
    let key = KeyPair::from_pem(key_pem)
        .map_err(|source| IdentityError::Rcgen { what: "cannot read the key (PEM)", source })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|source| IdentityError::Rcgen { what: "cannot build the CSR", source })
}
