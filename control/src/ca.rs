//! The mesh CA: issues every proxy's workload certificate from its CSR.
//!
//! The issuing certificate and key are either made on first start (a
//! self-signed ECDSA P-256 root, kept in the data directory and reused on
//! every later start) or the operator's own (`--ca-cert` with its chain up
//! to the root, `--ca-key`), as Istio's plugged-in CA certificates. The SAN
//! of a workload certificate is never taken from the CSR: it is the SPIFFE
//! id the control plane decided the proxy may have — the CSR only brings
//! the public key, and proof that the proxy holds its private half.
//!
//! The trust bundle is every root this CA has issued under that has not
//! expired (kept in `trust-bundle.pem`), so when the operator rotates the
//! root the old one stays trusted until proxies have moved to the new one.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use lumen_core::identity::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Istio's default workload certificate lifetime.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A generated root's lifetime (Istio's self-signed root: 10 years).
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("cannot make the mesh CA: {0}")]
    Generate(String),
    #[error("the certificate signing request is invalid: {0}")]
    BadCsr(String),
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// What the CA issued for one proxy.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The workload certificate first, then the CA's chain up to (not
    /// including) the root, PEM.
    pub chain: Vec<String>,
    pub not_after: SystemTime,
    pub serial: String,
}

/// Where the CA's certificate and key come from.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// Made on first start in this directory, reused after.
    Generated(PathBuf),
    /// The operator's: the issuing certificate (followed by its chain up
    /// to the root) and its key; `dir` keeps the trust bundle.
    Files {
        cert: PathBuf,
        key: PathBuf,
        dir: PathBuf,
    },
}

pub struct MeshCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The issuing certificate and the intermediates above it, PEM (the
    /// root is in the trust bundle, not sent with every chain).
    chain: Vec<String>,
    roots: Vec<String>,
    issuer_not_after: SystemTime,
    lifetime: Duration,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("MeshCa")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .finish()
    }
}

fn file_error(path: &Path, why: impl std::fmt::Display) -> CaError {
    CaError::File {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| file_error(path, e))
}

/// Writes a file only its owner may read.
pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| file_error(&tmp, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| file_error(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_error(path, e))
}

/// The PEM certificates in `text`, in order.
fn certificates(text: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(text.as_bytes()).collect();
    let certs = certs.map_err(|e| file_error(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in it"));
    }
    Ok(certs)
}

/// A certificate as PEM, 64 columns a line.
pub fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A certificate's end of validity.
pub fn not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = cert.validity().not_after.timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

impl MeshCa {
    pub fn open(source: &CaSource, trust_domain: &str) -> Result<Self, CaError> {
        let (cert_path, key_path, dir) = match source {
            CaSource::Generated(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
                let (cert, key) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
                if !cert.exists() {
                    let (c, k) = generate_root(trust_domain)?;
                    write_private(&key, &k)?;
                    write_private(&cert, &c)?;
                    tracing::info!(path = %cert.display(), "made a new mesh root CA");
                }
                (cert, key, dir.clone())
            }
            CaSource::Files { cert, key, dir } => {
                std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
                (cert.clone(), key.clone(), dir.clone())
            }
        };
        let certs = certificates(&read(&cert_path)?, &cert_path)?;
        let key = KeyPair::from_pem(&read(&key_path)?)
            .map_err(|e| file_error(&key_path, format!("not a usable private key: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&certs[0], key)
            .map_err(|e| file_error(&cert_path, format!("not a CA certificate: {e}")))?;
        let issuer_not_after = not_after(&certs[0])
            .ok_or_else(|| file_error(&cert_path, "cannot read the certificate's validity"))?;
        // The last certificate is the root; the ones before it are sent
        // with every workload certificate.
        let root = pem(&certs[certs.len() - 1]);
        let chain: Vec<String> = if certs.len() == 1 {
            Vec::new()
        } else {
            certs[..certs.len() - 1].iter().map(|c| pem(c)).collect()
        };
        let roots = remember_root(&dir.join("trust-bundle.pem"), &root)?;
        Ok(MeshCa {
            trust_domain: trust_domain.into(),
            issuer,
            chain,
            roots,
            issuer_not_after,
            lifetime: DEFAULT_LIFETIME,
        })
    }

    /// Workload certificates last this long (24 h unless set).
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The roots proxies trust, PEM, newest first.
    pub fn trust_bundle(&self) -> &[String] {
        &self.roots
    }

    /// A certificate for `id` over the CSR's key. The CSR's own subject and
    /// SANs are ignored.
    pub fn sign(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        lifetime: Option<Duration>,
    ) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let now = SystemTime::now();
        let lifetime = lifetime.unwrap_or(self.lifetime).min(self.lifetime);
        // Never beyond the issuer's own end.
        let end = (now + lifetime).min(self.issuer_not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e| CaError::Sign(format!("{id}: {e}")))?,
        )];
        params.not_before = (now - BACKDATE).into();
        params.not_after = end.into();
        let serial: [u8; 16] = rand_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok(Issued {
            chain,
            not_after: end,
            serial: hex(&serial),
        })
    }
}

/// A TLS server certificate the CA made, with its key.
pub struct Serving {
    /// The certificate first, then the CA's chain (PEM).
    pub chain: Vec<String>,
    /// Its private key (PKCS#8 PEM); never logged or written out.
    pub key: String,
    pub not_after: SystemTime,
}

impl MeshCa {
    /// A server certificate for `dns_names` on a fresh key, lasting as
    /// long as workload certificates: what the sidecar injector's webhook
    /// serves, so the API server (given the trust bundle as `caBundle`)
    /// can check it.
    pub fn serving(&self, dns_names: &[String]) -> Result<Serving, CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let now = SystemTime::now();
        let end = (now + self.lifetime).min(self.issuer_not_after);
        let mut params = CertificateParams::new(dns_names.to_vec())
            .map_err(|e| CaError::Sign(format!("{dns_names:?}: {e}")))?;
        params.distinguished_name = DistinguishedName::new();
        if let Some(name) = dns_names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, name.clone());
        }
        params.not_before = (now - BACKDATE).into();
        params.not_after = end.into();
        params.serial_number = Some(SerialNumber::from_slice(&rand_serial()));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok(Serving {
            chain,
            key: key.serialize_pem(),
            not_after: end,
        })
    }
}

/// The join token kept at `path`, made there (256 random bits, readable by
/// its owner only) when there is none. Local proxies present it for
/// their certificates.
pub fn join_token(path: &Path) -> Result<String, CaError> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => return Err(file_error(path, "the join token file is empty")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(file_error(path, e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    }
    let token = hex(&rand::random::<[u8; 32]>());
    write_private(path, &format!("{token}\n"))?;
    Ok(token)
}

/// 128 random bits (a CSPRNG's), positive as a DER serial must be.
fn rand_serial() -> [u8; 16] {
    let mut s: [u8; 16] = rand::random();
    s[0] &= 0x7f;
    s
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A self-signed root for `trust_domain`: (certificate, key), PEM.
pub(crate) fn generate_root(trust_domain: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate().map_err(|e| CaError::Generate(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "Lumen mesh root CA");
    params.distinguished_name = dn;
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    params.serial_number = Some(SerialNumber::from_slice(&rand_serial()));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Generate(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Adds `root` to the bundle kept at `path` (if new) and returns the
/// bundle's roots that have not expired, `root` first.
fn remember_root(path: &Path, root: &str) -> Result<Vec<String>, CaError> {
    let known = match std::fs::read_to_string(path) {
        Ok(t) => certificates(&t, path)?.iter().map(|c| pem(c)).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(file_error(path, e)),
    };
    let now = SystemTime::now();
    let mut roots = vec![root.to_string()];
    for r in known {
        if r == root {
            continue;
        }
        let der = certificates(&r, path)?;
        if not_after(&der[0]).is_some_and(|end| end > now) {
            roots.push(r);
        }
    }
    write_private(path, &roots.concat())?;
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        // A CSR asking for an identity the CA must not give.
        let params = CertificateParams::new(vec!["evil.example".into()]).unwrap();
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    fn sans(pem_text: &str) -> Vec<String> {
        let der = certificates(pem_text, Path::new("x")).unwrap();
        lumen_core::identity::uri_sans(&der[0])
    }

    #[test]
    fn a_generated_root_is_kept_and_signs_the_id_the_control_plane_chose() {
        let dir = tempfile::tempdir().unwrap();
        let source = CaSource::Generated(dir.path().join("ca"));
        let ca = MeshCa::open(&source, "cluster.local").unwrap();
        let (_, csr) = csr();
        let id = SpiffeId::new("cluster.local", "default", "bookinfo-reviews");
        let issued = ca.sign(&csr, &id, None).unwrap();
        assert_eq!(issued.chain.len(), 1, "signed by the root itself");
        assert_eq!(
            sans(&issued.chain[0]),
            ["spiffe://cluster.local/ns/default/sa/bookinfo-reviews"]
        );
        let left = issued.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left <= DEFAULT_LIFETIME && left > DEFAULT_LIFETIME - Duration::from_secs(60));
        // The key is private to its owner.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca/ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
        // Opened again: the same root.
        let again = MeshCa::open(&source, "cluster.local").unwrap();
        assert_eq!(again.trust_bundle(), ca.trust_bundle());
        // A chain rustls/webpki accepts as a client and server certificate.
        let roots = certificates(&ca.trust_bundle()[0], Path::new("r")).unwrap();
        let anchor = webpki::anchor_from_trusted_cert(&roots[0]).unwrap();
        let leaf = certificates(&issued.chain[0], Path::new("l")).unwrap();
        let end = webpki::EndEntityCert::try_from(&leaf[0]).unwrap();
        let now = rustls::pki_types::UnixTime::now();
        for usage in [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ] {
            end.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                std::slice::from_ref(&anchor),
                &[],
                now,
                usage,
                None,
                None,
            )
            .unwrap();
        }
    }

    #[test]
    fn a_rotated_root_stays_in_the_bundle_beside_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let gen_dir = dir.path().join("ca");
        let old = MeshCa::open(&CaSource::Generated(gen_dir.clone()), "cluster.local").unwrap();
        // The operator brings a root of their own.
        let (cert, key) = generate_root("cluster.local").unwrap();
        std::fs::write(dir.path().join("new.pem"), &cert).unwrap();
        std::fs::write(dir.path().join("new-key.pem"), &key).unwrap();
        let new = MeshCa::open(
            &CaSource::Files {
                cert: dir.path().join("new.pem"),
                key: dir.path().join("new-key.pem"),
                dir: gen_dir,
            },
            "cluster.local",
        )
        .unwrap();
        assert_eq!(new.trust_bundle().len(), 2);
        assert_eq!(new.trust_bundle()[0], cert);
        assert_eq!(new.trust_bundle()[1], old.trust_bundle()[0]);
    }

    #[test]
    fn a_bad_csr_or_key_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ca = MeshCa::open(&CaSource::Generated(dir.path().into()), "cluster.local").unwrap();
        let id = SpiffeId::new("cluster.local", "default", "x");
        let err = ca.sign("not a csr", &id, None).unwrap_err();
        assert!(
            err.to_string().contains("certificate signing request"),
            "{err}"
        );
        std::fs::write(dir.path().join("k.pem"), "junk").unwrap();
        let err = MeshCa::open(
            &CaSource::Files {
                cert: dir.path().join("ca-cert.pem"),
                key: dir.path().join("k.pem"),
                dir: dir.path().into(),
            },
            "cluster.local",
        )
        .unwrap_err();
        assert!(err.to_string().contains("private key"), "{err}");
    }
}
