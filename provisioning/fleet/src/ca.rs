//! The fleet's certificate authority (rcgen): created on first start, its key stored owner-only
//! (0600). It signs the fleet's own server certificate, node certificates (URI SAN
//! `urn:hearth:node:ID`, client auth, valid days) and operator certificates (URI SAN
//! `urn:hearth:operator:ROLE:NAME`).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hearth_fleet_client::{NODE_URI_PREFIX, OPERATOR_URI_PREFIX};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// Why the CA could not be loaded, created or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{op} {path}")]
    Io {
        /// What.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// rcgen refused.
    #[error("{what}")]
    Rcgen {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// A key file is readable by others.
    #[error("{path} is readable by group or others (mode {mode:o}): chmod 600 it")]
    KeyMode {
        /// The key file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

fn rc(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CaError {
    let what = what.into();
    move |source| CaError::Rcgen { what, source }
}

/// Operator roles.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read-only.
    Viewer,
    /// Everything.
    Admin,
}

impl Role {
    /// As in the certificate.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }
}

/// A certificate issued to a node or an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// PEM.
    pub cert_pem: String,
    /// Serial (hex).
    pub serial: String,
    /// Validity start, ms since the Unix epoch.
    pub not_before_ms: u64,
    /// Expiry, ms since the Unix epoch.
    pub not_after_ms: u64,
}

/// The loaded CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    dir: PathBuf,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Write a new file owner-only (0600) and fsync it; refuses to replace an existing one.
fn write_new_private(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    let io = |op| move |source| CaError::Io { op, path: path.to_path_buf(), source };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create"))?;
    f.write_all(bytes).map_err(io("write"))?;
    f.sync_all().map_err(io("fsync"))
}

fn read_key(path: &Path) -> Result<String, CaError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(|source| CaError::Io {
        op: "stat",
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyMode { path: path.to_path_buf(), mode });
    }
    fs::read_to_string(path).map_err(|source| CaError::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Ca {
    /// Load the CA from `dir` (`ca.crt`, `ca.key`), creating it (and `dir`, 0700) on first use.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<Self, CaError> {
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        if !cert_path.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| CaError::Io { op: "create", path: dir.to_path_buf(), source })?;
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(rc("cannot generate the CA key"))?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, format!("Hearth fleet CA ({name})"));
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_before = SystemTime::now().into();
            params.not_after = (SystemTime::now() + Duration::from_secs(10 * 365 * 86_400)).into();
            params.serial_number = Some(random_serial());
            let cert = params.self_signed(&key).map_err(rc("cannot self-sign the CA"))?;
            write_new_private(&key_path, key.serialize_pem().as_bytes())?;
            write_new_private(&cert_path, cert.pem().as_bytes())?;
            tracing::info!(dir = %dir.display(), "created the fleet CA");
        }
        let cert_pem = fs::read_to_string(&cert_path).map_err(|source| CaError::Io {
            op: "read",
            path: cert_path.clone(),
            source,
        })?;
        let key = KeyPair::from_pem(&read_key(&key_path)?)
            .map_err(rc(format!("cannot read the CA key {}", key_path.display())))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(rc(format!("cannot read the CA certificate {}", cert_path.display())))?;
        Ok(Self { issuer, cert_pem, dir: dir.to_path_buf() })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The pin nodes put in their seed: SHA-256 of the CA's DER.
    pub fn pin(&self) -> String {
        hearth_fleet_client::tls::pin_of_pem(&self.cert_pem).unwrap_or_default()
    }

    fn leaf_params(
        &self,
        cn: &str,
        sans: Vec<SanType>,
        validity: Duration,
        backdate: Duration,
    ) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = (now - backdate).into();
        params.not_after = (now - backdate + validity).into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params
    }

    fn issued(params: &CertificateParams, pem: String) -> Issued {
        let serial = params.serial_number.as_ref().map(|s| hex(&s.to_bytes())).unwrap_or_default();
        Issued {
            cert_pem: pem,
            serial,
            not_before_ms: ms(params.not_before.into()),
            not_after_ms: ms(params.not_after.into()),
        }
    }

    /// The fleet's own server certificate for `name` (and the key it was made for).
    pub fn server_cert(&self, name: &str) -> Result<(Issued, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(rc("cannot generate the server key"))?;
        let san = match name.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                SanType::DnsName(name.try_into().map_err(rc(format!("bad fleet name {name:?}")))?)
            }
        };
        let mut params = self.leaf_params(
            name,
            vec![san],
            Duration::from_secs(90 * 86_400),
            Duration::from_secs(60),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rc("cannot sign the server certificate"))?;
        Ok((Self::issued(&params, cert.pem()), key.serialize_pem()))
    }

    /// Sign a node certificate for `node_id` over the key in a verified CSR; every other field of
    /// the CSR is ignored. `backdate` moves the validity window into the past (tests of expiry).
    pub fn sign_node(
        &self,
        csr: &CertificateSigningRequestParams,
        node_id: &str,
        validity: Duration,
        backdate: Duration,
    ) -> Result<Issued, CaError> {
        let uri = format!("{NODE_URI_PREFIX}{node_id}");
        let san =
            SanType::URI(uri.as_str().try_into().map_err(rc(format!("bad node id {node_id:?}")))?);
        let mut params = self.leaf_params(node_id, vec![san], validity, backdate);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(rc("cannot sign the node certificate"))?;
        Ok(Self::issued(&params, cert.pem()))
    }

    /// An operator certificate and its new key (PEM).
    pub fn operator_cert(
        &self,
        name: &str,
        role: Role,
        validity: Duration,
    ) -> Result<(Issued, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(rc("cannot generate the operator key"))?;
        let uri = format!("{OPERATOR_URI_PREFIX}{}:{name}", role.as_str());
        let san = SanType::URI(
            uri.as_str().try_into().map_err(rc(format!("bad operator name {name:?}")))?,
        );
        let mut params = self.leaf_params(name, vec![san], validity, Duration::from_secs(60));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rc("cannot sign the operator certificate"))?;
        Ok((Self::issued(&params, cert.pem()), key.serialize_pem()))
    }

    /// Where its files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Who a verified peer certificate says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// No client certificate.
    Anonymous,
    /// A node.
    Node(String),
    /// An operator.
    Operator {
        /// Name.
        name: String,
        /// Role.
        role: Role,
    },
    /// A certificate from our CA that names neither.
    Unknown,
}

/// Read the URI SAN of a (verified) client certificate.
pub fn peer_of(der: Option<&[u8]>) -> Peer {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Some(der) = der else { return Peer::Anonymous };
    let Ok((_, cert)) = X509Certificate::from_der(der) else { return Peer::Unknown };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Peer::Unknown };
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if let Some(id) = uri.strip_prefix(NODE_URI_PREFIX) {
                return Peer::Node(id.to_string());
            }
            if let Some(rest) = uri.strip_prefix(OPERATOR_URI_PREFIX) {
                let (role, name) = rest.split_once(':').unwrap_or((rest, ""));
                let role = match role {
                    "admin" => Role::Admin,
                    "viewer" => Role::Viewer,
                    _ => return Peer::Unknown,
                };
                return Peer::Operator { name: name.to_string(), role };
            }
        }
    }
    Peer::Unknown
}
