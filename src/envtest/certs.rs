//! Certificates for a local control plane: a serving CA and cert for kube-apiserver, a client CA
//! with an admin client cert (CN admin, O system:masters), and the service-account key pair.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::EnvtestError;

/// File names inside the certificate directory.
pub const SERVING_CA: &str = "serving-ca.crt";
pub const SERVING_CERT: &str = "apiserver.crt";
pub const SERVING_KEY: &str = "apiserver.key";
pub const CLIENT_CA: &str = "client-ca.crt";
pub const ADMIN_CERT: &str = "admin.crt";
pub const ADMIN_KEY: &str = "admin.key";
pub const SA_PUB: &str = "sa.pub";
pub const SA_KEY: &str = "sa.key";

fn ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate()?)
}

/// Writes a CA (`agent-ca.crt`) and, for each site, `<site>.crt` and `<site>.key` valid for
/// 127.0.0.1 and localhost: what `twinsite agent --tls-cert/--tls-key` and a Site's
/// `caSecretRef` need on one machine. Returns the CA's PEM.
pub fn agent_certificates(dir: &Path, sites: &[&str]) -> Result<String, EnvtestError> {
    let write = |name: &str, contents: String| {
        std::fs::write(dir.join(name), contents).map_err(|e| EnvtestError::io(dir.join(name), e))
    };
    let ca = ca("twinsite-agent-ca")?;
    for site in sites {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("twinsite agent {site}"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        write(&format!("{site}.crt"), cert.pem())?;
        write(&format!("{site}.key"), key.serialize_pem())?;
    }
    write("agent-ca.crt", ca.pem())?;
    Ok(ca.pem())
}

/// Writes every certificate and key the control plane needs into `dir`.
pub fn generate(dir: &Path) -> Result<(), EnvtestError> {
    let write = |name: &str, contents: String| {
        std::fs::write(dir.join(name), contents).map_err(|e| EnvtestError::io(dir.join(name), e))
    };

    let serving_ca = ca("twinsite-envtest-serving-ca")?;
    let mut params = CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "kubernetes.default.svc".to_string(),
    ])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_key = KeyPair::generate()?;
    let serving = params.signed_by(&serving_key, &serving_ca)?;
    write(SERVING_CA, serving_ca.pem())?;
    write(SERVING_CERT, serving.pem())?;
    write(SERVING_KEY, serving_key.serialize_pem())?;

    let client_ca = ca("twinsite-envtest-client-ca")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "admin");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_key = KeyPair::generate()?;
    let admin = params.signed_by(&admin_key, &client_ca)?;
    write(CLIENT_CA, client_ca.pem())?;
    write(ADMIN_CERT, admin.pem())?;
    write(ADMIN_KEY, admin_key.serialize_pem())?;

    let sa = KeyPair::generate()?;
    write(SA_PUB, sa.public_key_pem())?;
    write(SA_KEY, sa.serialize_pem())?;
    Ok(())
}
