//! Certificates for tests: a CA and leaf certificates written in `tls-creds-x509`'s layout.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, CustomExtension, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, date_time_ymd,
};
use std::path::Path;

/// When a leaf certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// From 2020 to 2100.
    Current,
    /// 2000 to 2001.
    Expired,
    /// 2090 to 2100.
    NotYetValid,
}

/// What a leaf certificate says.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// Subject common name.
    pub common_name: String,
    /// Subject organisation, when set.
    pub organisation: Option<String>,
    /// DNS names and IP addresses it is valid for.
    pub names: Vec<String>,
    /// Validity period.
    pub validity: Validity,
    /// Bytes of an extra non-critical extension (to make an oversized certificate).
    pub padding: usize,
}

impl Leaf {
    /// A currently valid certificate for `common_name`, valid for `localhost` and 127.0.0.1.
    pub fn new(common_name: &str) -> Leaf {
        Leaf {
            common_name: common_name.to_owned(),
            organisation: None,
            names: vec!["localhost".into(), "127.0.0.1".into()],
            validity: Validity::Current,
            padding: 0,
        }
    }
}

/// A test certificate authority.
#[derive(Debug)]
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A new CA named `name` with a fresh P-256 key.
    pub fn new(name: &str) -> TestCa {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("no names");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2100, 1, 1);
        let key = KeyPair::generate().expect("key generation");
        TestCa {
            issuer: CertifiedIssuer::self_signed(p, key).expect("self-signed CA"),
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate and its key, PEM, for a server (`server`) or a client.
    pub fn leaf(&self, leaf: &Leaf, server: bool) -> (String, String) {
        let mut p = CertificateParams::new(leaf.names.clone()).expect("valid names");
        p.distinguished_name
            .push(DnType::CommonName, leaf.common_name.as_str());
        if let Some(o) = &leaf.organisation {
            p.distinguished_name
                .push(DnType::OrganizationName, o.as_str());
        }
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        (p.not_before, p.not_after) = match leaf.validity {
            Validity::Current => (date_time_ymd(2020, 1, 1), date_time_ymd(2100, 1, 1)),
            Validity::Expired => (date_time_ymd(2000, 1, 1), date_time_ymd(2001, 1, 1)),
            Validity::NotYetValid => (date_time_ymd(2090, 1, 1), date_time_ymd(2100, 1, 1)),
        };
        if leaf.padding > 0 {
            p.custom_extensions = vec![CustomExtension::from_oid_content(
                &[1, 3, 6, 1, 4, 1, 55555, 1],
                vec![0x04; leaf.padding],
            )];
        }
        let key = KeyPair::generate().expect("key generation");
        let cert = p.signed_by(&key, &self.issuer).expect("signed leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// Write `dir/ca-cert.pem` and `dir/{server,client}-{cert,key}.pem` for `leaf`.
    pub fn write(&self, dir: &Path, leaf: &Leaf, server: bool) {
        std::fs::create_dir_all(dir).expect("create creds dir");
        let who = if server { "server" } else { "client" };
        let (cert, key) = self.leaf(leaf, server);
        std::fs::write(dir.join("ca-cert.pem"), self.cert_pem()).expect("write ca-cert.pem");
        std::fs::write(dir.join(format!("{who}-cert.pem")), cert).expect("write cert");
        std::fs::write(dir.join(format!("{who}-key.pem")), key).expect("write key");
    }
}
