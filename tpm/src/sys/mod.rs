//! The TPM backend over tss-esapi. Everything that talks to the TPM is here;
//! the hierarchy above works with blobs, secrets and handles-free results.

use std::str::FromStr;

use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::{
    NvIndexAttributesBuilder, ObjectAttributesBuilder, SessionAttributesBuilder,
};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::{
    CapabilityType, NvIndexType, SessionType, StartupType, Tss2ResponseCodeKind,
};
use tss_esapi::handles::{KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, NvAuth, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Auth, CapabilityData, Data, Digest, DigestValues, EccPoint, HashScheme, HashcheckTicket,
    KeyedHashScheme, MaxNvBuffer, NvPublicBuilder, PcrSelectionListBuilder, PcrSlot, Private,
    Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyRsa, PublicKeyedHashParameters,
    PublicRsaParametersBuilder, RsaDecryptionScheme, RsaExponent, RsaScheme, SensitiveData,
    Signature, SignatureScheme, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::Context;
use zeroize::Zeroizing;

use crate::envelope::RecipientKey;
use crate::error::{KeyError, Result};
use crate::state::Blob;
use crate::types::{GenerationSecret, Role, TpmKind};

/// First NV index of Leasehold's range ("LH" in the owner range 0x01xxxxxx).
pub(crate) const NV_BASE: u32 = 0x014c_4800;
/// Size of the secrets' range: 256 generations per role, 4 roles reserved.
pub(crate) const NV_SPAN: u32 = 0x400;
/// The epoch counter (TPM2_NT_COUNTER), just after the secrets' range: it
/// counts manifest writes, so a restored copy of the state directory is
/// told from the current one. Part of Leasehold's NV range.
pub(crate) const NV_EPOCH: u32 = NV_BASE + NV_SPAN;

fn tpm_err(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> KeyError {
    move |source| KeyError::Tpm { op, source }
}

fn rc_kind(e: &tss_esapi::Error) -> Option<Tss2ResponseCodeKind> {
    match e {
        tss_esapi::Error::Tss2Error(rc) => rc.kind(),
        tss_esapi::Error::WrapperError(_) => None,
    }
}

/// Marks every open descriptor above stderr close-on-exec. The TSS library
/// opens the TPM device (or socket) without it, so every child the agent
/// runs (nft, mount, mkfs) would otherwise hold a TPM connection. Called
/// right after connecting, when the agent's other descriptors are Rust's
/// (already close-on-exec) or the TSS library's.
fn close_on_exec_all() {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for e in dir.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if fd < 3 {
            continue;
        }
        if let Ok(flags) = fcntl(fd, FcntlArg::F_GETFD) {
            let flags = FdFlag::from_bits_truncate(flags);
            if !flags.contains(FdFlag::FD_CLOEXEC) {
                let _ = fcntl(fd, FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC));
            }
        }
    }
}

/// Validates a TCTI string from the configuration.
pub(crate) fn parse_tcti(tcti: &str) -> Result<TctiNameConf> {
    let allowed = ["device:", "swtpm:", "mssim:", "tabrmd:"];
    if !allowed.iter().any(|p| tcti.starts_with(p))
        && !["device", "swtpm", "mssim", "tabrmd"].contains(&tcti)
    {
        return Err(KeyError::InvalidTcti {
            tcti: tcti.to_owned(),
            reason: "expected device:PATH, swtpm:host=H,port=P, mssim:... or tabrmd:...",
        });
    }
    TctiNameConf::from_str(tcti).map_err(|_| KeyError::InvalidTcti {
        tcti: tcti.to_owned(),
        reason: "cannot parse the TCTI options",
    })
}

/// Validates and normalises a PCR list (sorted, deduplicated, 0..=23).
pub(crate) fn normalise_pcrs(pcrs: &[u8]) -> Result<Vec<u8>> {
    let mut v = pcrs.to_vec();
    v.sort_unstable();
    v.dedup();
    if let Some(bad) = v.iter().find(|p| **p > 23) {
        return Err(KeyError::InvalidPcr(*bad));
    }
    Ok(v)
}

/// A connection to the TPM with the storage primary key loaded.
pub(crate) struct Tpm {
    ctx: Context,
    primary: KeyHandle,
    /// Salted HMAC session (salt encrypted to the primary): authValues never
    /// cross the TPM bus in clear and secret parameters are encrypted.
    session: AuthSession,
    kind: TpmKind,
    identity: String,
    /// Set once the primary and session are flushed (by `shutdown`).
    flushed: bool,
}

impl Drop for Tpm {
    /// Flushes the primary and session when the hierarchy is dropped without
    /// `shutdown` (e.g. `open` refused the state): without a resource manager
    /// (swtpm over TCP) they would otherwise fill the TPM's object slots.
    fn drop(&mut self) {
        if !self.flushed {
            self.flushed = true;
            let (primary, session) = (self.primary, self.session);
            self.flush_session(session);
            self.flush(primary);
        }
    }
}

/// Which parameters of a command the session encrypts. The TPM refuses the
/// flag for a command whose first parameter is not a sized buffer.
#[derive(Clone, Copy)]
enum Enc {
    /// First command parameter (secret going in).
    In,
    /// First response parameter (secret coming out).
    Out,
    /// Both.
    Both,
    /// Neither (command has no buffer parameters).
    None,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Tpm {
    /// Connects and recreates the storage primary from its fixed template.
    pub fn connect(tcti: &str) -> Result<Self> {
        let conf = parse_tcti(tcti)?;
        let simulator = matches!(conf, TctiNameConf::Swtpm(_) | TctiNameConf::Mssim(_));
        let mut ctx = Context::new(conf).map_err(|source| KeyError::Connect {
            tcti: tcti.to_owned(),
            source,
        })?;
        close_on_exec_all();
        let vendor = tss_esapi::utils::get_tpm_vendor(&mut ctx).unwrap_or_default();
        // swtpm reports vendor "SW TPM"; a TCTI to a simulator is software regardless.
        let kind = if simulator || (vendor.contains("SW") && vendor.contains("TPM")) {
            TpmKind::Software
        } else {
            TpmKind::Hardware
        };
        let created = ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(
                    Hierarchy::Owner,
                    primary_template()?,
                    None,
                    None,
                    None,
                    None,
                )
            })
            .map_err(tpm_err("CreatePrimary (storage key)"))?;
        // The primary is derived from the owner seed: its public area names this TPM.
        let public = created
            .out_public
            .marshall()
            .map_err(tpm_err("marshal primary public"))?;
        let identity = hex::encode(&Sha256::digest(&public)[..16]);
        let primary = created.key_handle;
        let session = ctx
            .start_auth_session(
                Some(primary),
                None,
                None,
                SessionType::Hmac,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(tpm_err("StartAuthSession (salted HMAC)"))?
            .ok_or(KeyError::UnexpectedTpmResponse("empty session handle"))?;
        Ok(Self {
            ctx,
            primary,
            session,
            kind,
            identity,
            flushed: false,
        })
    }

    /// Runs `f` with the salted session, with parameter encryption as given.
    fn authed<T>(
        &mut self,
        enc: Enc,
        f: impl FnOnce(&mut Context) -> tss_esapi::Result<T>,
    ) -> tss_esapi::Result<T> {
        let (dec_in, enc_out) = match enc {
            Enc::In => (true, false),
            Enc::Out => (false, true),
            Enc::Both => (true, true),
            Enc::None => (false, false),
        };
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(dec_in)
            .with_encrypt(enc_out)
            .build();
        self.ctx.tr_sess_set_attributes(self.session, attrs, mask)?;
        self.ctx.execute_with_session(Some(self.session), f)
    }

    /// Stable identity of this TPM's owner seed.
    pub fn identity(&self) -> String {
        self.identity.clone()
    }

    pub fn kind(&self) -> TpmKind {
        self.kind
    }

    /// Random bytes from the TPM RNG.
    pub fn random(&mut self, n: usize) -> Result<Zeroizing<Vec<u8>>> {
        let mut out = Zeroizing::new(Vec::with_capacity(n));
        while out.len() < n {
            let want = (n - out.len()).min(32);
            let chunk = self
                .authed(Enc::Out, |c| c.get_random(want))
                .map_err(tpm_err("GetRandom"))?;
            if chunk.value().is_empty() {
                return Err(KeyError::UnexpectedTpmResponse("empty GetRandom result"));
            }
            out.extend_from_slice(chunk.value());
        }
        Ok(out)
    }

    pub fn random32(&mut self) -> Result<Zeroizing<[u8; 32]>> {
        let v = self.random(32)?;
        let mut a = Zeroizing::new([0u8; 32]);
        a.copy_from_slice(&v);
        Ok(a)
    }

    /// Creates an RSA-2048 OAEP-SHA256 decryption key under the primary.
    pub fn create_decrypt_key(&mut self, auth: &[u8; 32]) -> Result<(Blob, RecipientKey)> {
        let public = rsa_template(RsaUse::Decrypt).map_err(tpm_err("build RSA template"))?;
        let auth = Auth::try_from(auth.to_vec()).map_err(tpm_err("build auth value"))?;
        self.create_rsa_key(public, Some(auth), "Create (RSA decryption key)")
    }

    /// Creates the node's RSA-2048 RSASSA-PKCS1-v1_5 SHA-256 signing key
    /// under the primary. Its authValue is empty: the blob loads only under
    /// this TPM's primary, and only root can reach the TPM or the state dir.
    pub fn create_signing_key(&mut self) -> Result<(Blob, RecipientKey)> {
        let public = rsa_template(RsaUse::Sign).map_err(tpm_err("build RSA template"))?;
        self.create_rsa_key(public, None, "Create (RSA signing key)")
    }

    /// Creates the node's attestation key (AK): a *restricted* RSA-2048
    /// RSASSA-PKCS1-v1_5 SHA-256 signing key under the primary. Restricted:
    /// the TPM signs with it only digests it computed itself (quotes,
    /// certifications), never a caller's digest that could imitate a quote.
    pub fn create_attestation_key(&mut self) -> Result<(Blob, RecipientKey)> {
        let public = rsa_template(RsaUse::Attest).map_err(tpm_err("build AK template"))?;
        self.create_rsa_key(public, None, "Create (attestation key)")
    }

    /// Loads the AK blob and returns the fingerprint of the public key the
    /// TPM reports for it, and whether the TPM says it is restricted.
    pub fn attestation_fingerprint(
        &mut self,
        blob: &Blob,
        path: &std::path::Path,
    ) -> Result<(String, bool)> {
        let h = self.load_as(blob, attestation_key_unusable(path))?;
        let public = self.read_public_of(h)?;
        let restricted = public.object_attributes().restricted();
        Ok((recipient_of(&public)?.fingerprint_hex(), restricted))
    }

    /// TPM2_Quote with the AK over the sha256 bank of `pcrs` (normalised,
    /// non-empty) with `qualifying` as extraData. Returns the marshalled
    /// TPMS_ATTEST, the raw RSASSA signature and the PCR values read right
    /// after (the verifier checks them against the quote's digest).
    pub fn quote(
        &mut self,
        blob: &Blob,
        path: &std::path::Path,
        qualifying: &[u8; 32],
        pcrs: &[u8],
    ) -> Result<Quoted> {
        let data = Data::try_from(qualifying.to_vec()).map_err(tpm_err("build qualifying data"))?;
        let selection = pcr_selection(pcrs)?;
        let scheme = SignatureScheme::RsaSsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        let h = self.load_as(blob, attestation_key_unusable(path))?;
        let result = self
            .authed(Enc::None, |c| c.quote(h, data, scheme, selection))
            .map_err(tpm_err("Quote"));
        self.flush(h);
        let (attest, signature) = result?;
        let signature = match signature {
            Signature::RsaSsa(s) if s.hashing_algorithm() == HashingAlgorithm::Sha256 => {
                s.signature().value().to_vec()
            }
            _ => {
                return Err(KeyError::UnexpectedTpmResponse(
                    "quote signature scheme (expected RSASSA-PKCS1-v1_5 with SHA-256)",
                ))
            }
        };
        let attest = attest.marshall().map_err(tpm_err("marshal TPMS_ATTEST"))?;
        let mut values = Vec::with_capacity(pcrs.len());
        for p in pcrs {
            values.push((*p, self.pcr_value(*p)?));
        }
        Ok(Quoted {
            attest,
            signature,
            pcr_values: values,
        })
    }

    /// The sha256-bank value of one PCR.
    fn pcr_value(&mut self, pcr: u8) -> Result<Vec<u8>> {
        let sel = pcr_selection(&[pcr])?;
        let (_, _, digests) = self
            .ctx
            .execute_without_session(|c| c.pcr_read(sel))
            .map_err(tpm_err("PCR_Read"))?;
        let d = digests
            .value()
            .first()
            .ok_or(KeyError::UnexpectedTpmResponse(
                "PCR_Read without the SHA-256 bank",
            ))?;
        Ok(d.value().to_vec())
    }

    fn create_rsa_key(
        &mut self,
        template: Public,
        auth: Option<Auth>,
        op: &'static str,
    ) -> Result<(Blob, RecipientKey)> {
        let primary = self.primary;
        let created = self
            .authed(Enc::Both, |c| {
                c.create(primary, template, auth, None, None, None)
            })
            .map_err(tpm_err(op))?;
        let recipient = recipient_of(&created.out_public)?;
        let blob = Blob {
            public: created
                .out_public
                .marshall()
                .map_err(tpm_err("marshal public area"))?,
            private: created.out_private.value().to_vec(),
        };
        Ok((blob, recipient))
    }

    /// Creates a sealed data object holding `data`; bound to `pcrs` if any.
    pub fn create_sealed(&mut self, data: &[u8; 32], auth: &[u8; 32], pcrs: &[u8]) -> Result<Blob> {
        let policy = if pcrs.is_empty() {
            Digest::default()
        } else {
            self.pcr_policy_digest(pcrs)?
        };
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_no_da(true)
            .with_admin_with_policy(true)
            // With a PCR policy the object is usable only through that policy.
            .with_user_with_auth(pcrs.is_empty())
            .build()
            .map_err(tpm_err("build sealed-object attributes"))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_auth_policy(policy)
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .map_err(tpm_err("build sealed-object template"))?;
        let auth = Auth::try_from(auth.to_vec()).map_err(tpm_err("build auth value"))?;
        let sensitive =
            SensitiveData::try_from(data.to_vec()).map_err(tpm_err("build sealed data"))?;
        let primary = self.primary;
        let created = self
            .authed(Enc::Both, |c| {
                c.create(primary, public, Some(auth), Some(sensitive), None, None)
            })
            .map_err(tpm_err("Create (sealed data object)"))?;
        Ok(Blob {
            public: created
                .out_public
                .marshall()
                .map_err(tpm_err("marshal public area"))?,
            private: created.out_private.value().to_vec(),
        })
    }

    fn load(&mut self, blob: &Blob, role: Role, what: &'static str) -> Result<KeyHandle> {
        self.load_as(blob, |source| KeyError::ForeignOrCorruptBlob {
            role,
            what,
            source,
        })
    }

    /// Loads a blob under the primary; `corrupt` names the object in the error.
    fn load_as(
        &mut self,
        blob: &Blob,
        corrupt: impl Fn(tss_esapi::Error) -> KeyError,
    ) -> Result<KeyHandle> {
        let public = Public::unmarshall(&blob.public).map_err(&corrupt)?;
        let private = Private::try_from(blob.private.clone()).map_err(&corrupt)?;
        let primary = self.primary;
        self.authed(Enc::In, |c| c.load(primary, private, public))
            .map_err(corrupt)
    }

    fn flush(&mut self, handle: KeyHandle) {
        if let Err(e) = self.ctx.flush_context(handle.into()) {
            tracing::warn!(error = %e, "could not flush a transient TPM object");
        }
    }

    /// Reads the public area of a loaded blob back from the TPM.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub fn read_public(&mut self, blob: &Blob, role: Role) -> Result<Public> {
        let h = self.load(blob, role, "object")?;
        self.read_public_of(h)
    }

    /// Reads the signing key's public area back from the TPM.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub fn read_signing_public(&mut self, blob: &Blob, path: &std::path::Path) -> Result<Public> {
        let h = self.load_as(blob, signing_key_unusable(path))?;
        self.read_public_of(h)
    }

    /// ReadPublic of a loaded object, which is flushed afterwards.
    fn read_public_of(&mut self, h: KeyHandle) -> Result<Public> {
        let r = self.ctx.execute_without_session(|c| c.read_public(h));
        self.flush(h);
        Ok(r.map_err(tpm_err("ReadPublic"))?.0)
    }

    /// RSASSA-PKCS1-v1_5 signature with the node signing key over a SHA-256
    /// digest computed by the caller. Returns the raw signature (modulus size).
    pub fn sign_digest(
        &mut self,
        blob: &Blob,
        path: &std::path::Path,
        digest: &[u8; 32],
    ) -> Result<Vec<u8>> {
        let digest = Digest::try_from(digest.to_vec()).map_err(tpm_err("build digest"))?;
        // A null ticket: the key is unrestricted, so the TPM need not have
        // hashed the data itself (a restricted key would insist on it).
        let validation = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .map_err(tpm_err("build null hashcheck ticket"))?;
        let scheme = SignatureScheme::RsaSsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        let h = self.load_as(blob, signing_key_unusable(path))?;
        // No parameter encryption: neither the digest nor the signature is
        // secret, and the response's first parameter is not a sized buffer.
        let result = self
            .authed(Enc::None, |c| c.sign(h, digest, scheme, validation))
            .map_err(tpm_err("Sign"));
        self.flush(h);
        match result? {
            Signature::RsaSsa(s) if s.hashing_algorithm() == HashingAlgorithm::Sha256 => {
                Ok(s.signature().value().to_vec())
            }
            _ => Err(KeyError::UnexpectedTpmResponse(
                "signature scheme (expected RSASSA-PKCS1-v1_5 with SHA-256)",
            )),
        }
    }

    /// RSA-OAEP-SHA256 decryption inside the TPM.
    pub fn rsa_decrypt(
        &mut self,
        blob: &Blob,
        auth: &[u8; 32],
        ciphertext: &[u8],
        role: Role,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let ct = PublicKeyRsa::try_from(ciphertext.to_vec())
            .map_err(|_| crate::error::EnvelopeError::UnwrapFailed(role))?;
        let h = self.load(blob, role, "key pair")?;
        let result = (|| {
            let auth = Auth::try_from(auth.to_vec()).map_err(tpm_err("build auth value"))?;
            self.ctx
                .tr_set_auth(h.into(), auth)
                .map_err(tpm_err("set key auth"))?;
            self.authed(Enc::Out, |c| {
                c.rsa_decrypt(
                    h,
                    ct,
                    RsaDecryptionScheme::Oaep(HashScheme::new(HashingAlgorithm::Sha256)),
                    Data::default(),
                )
            })
            .map(|m| Zeroizing::new(m.value().to_vec()))
            .map_err(|e| match rc_kind(&e) {
                Some(
                    Tss2ResponseCodeKind::Value
                    | Tss2ResponseCodeKind::Size
                    | Tss2ResponseCodeKind::Scheme,
                ) => crate::error::EnvelopeError::UnwrapFailed(role).into(),
                _ => KeyError::Tpm {
                    op: "RSA_Decrypt",
                    source: e,
                },
            })
        })();
        self.flush(h);
        match result {
            // libtpms (swtpm) answers a ciphertext that fails OAEP decoding
            // with TPM_RC_FAILURE, where the spec says TPM_RC_VALUE. It is
            // the input's fault exactly when the TPM still answers.
            Err(KeyError::Tpm { op, source })
                if rc_kind(&source) == Some(Tss2ResponseCodeKind::Failure) =>
            {
                if self.random(1).is_ok() {
                    Err(crate::error::EnvelopeError::UnwrapFailed(role).into())
                } else {
                    Err(KeyError::Tpm { op, source })
                }
            }
            other => other,
        }
    }

    /// Unseals a sealed data object (through a PCR policy session if bound).
    pub fn unseal(
        &mut self,
        blob: &Blob,
        auth: &[u8; 32],
        pcrs: &[u8],
        role: Role,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let h = self.load(blob, role, "sealed key")?;
        let result = if pcrs.is_empty() {
            (|| {
                let auth = Auth::try_from(auth.to_vec()).map_err(tpm_err("build auth value"))?;
                self.ctx
                    .tr_set_auth(h.into(), auth)
                    .map_err(tpm_err("set sealed-object auth"))?;
                self.authed(Enc::Out, |c| c.unseal(h.into()))
                    .map(|d| Zeroizing::new(d.value().to_vec()))
                    .map_err(tpm_err("Unseal"))
            })()
        } else {
            // The TPM keys response encryption with sessionKey || authValue of
            // the object, so ESYS must know the authValue even in a policy session.
            Auth::try_from(auth.to_vec())
                .and_then(|a| self.ctx.tr_set_auth(h.into(), a))
                .map_err(tpm_err("set sealed-object auth"))
                .and_then(|()| self.unseal_with_pcr_policy(h, pcrs, role))
        };
        self.flush(h);
        result
    }

    fn unseal_with_pcr_policy(
        &mut self,
        h: KeyHandle,
        pcrs: &[u8],
        role: Role,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let session = self.start_policy_session(SessionType::Policy)?;
        let result = (|| {
            let policy = PolicySession::try_from(session).map_err(tpm_err("policy session"))?;
            let selection = pcr_selection(pcrs)?;
            // An empty digest makes the TPM use the PCRs' current values.
            self.ctx
                .execute_without_session(|c| c.policy_pcr(policy, Digest::default(), selection))
                .map_err(tpm_err("PolicyPCR"))?;
            self.ctx
                .execute_with_session(Some(session), |c| c.unseal(h.into()))
                .map(|d| Zeroizing::new(d.value().to_vec()))
                .map_err(|e| match rc_kind(&e) {
                    Some(Tss2ResponseCodeKind::PolicyFail | Tss2ResponseCodeKind::PcrChanged) => {
                        KeyError::PcrMismatch {
                            role,
                            pcrs: pcrs.to_vec(),
                        }
                    }
                    _ => KeyError::Tpm {
                        op: "Unseal (PCR policy)",
                        source: e,
                    },
                })
        })();
        self.flush_session(session);
        result
    }

    fn start_policy_session(&mut self, ty: SessionType) -> Result<AuthSession> {
        // A real policy session is salted so the unsealed key is encrypted on the bus.
        let salt_key = (ty == SessionType::Policy).then_some(self.primary);
        let s = self
            .ctx
            .execute_without_session(|c| {
                c.start_auth_session(
                    salt_key,
                    None,
                    None,
                    ty,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
            })
            .map_err(tpm_err("StartAuthSession"))?
            .ok_or(KeyError::UnexpectedTpmResponse("empty session handle"))?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_encrypt(ty == SessionType::Policy)
            .build();
        self.ctx
            .tr_sess_set_attributes(s, attrs, mask)
            .map_err(tpm_err("set session attributes"))?;
        Ok(s)
    }

    fn flush_session(&mut self, s: AuthSession) {
        let h = tss_esapi::handles::SessionHandle::from(s);
        if let Err(e) = self.ctx.flush_context(h.into()) {
            tracing::warn!(error = %e, "could not flush a TPM session");
        }
    }

    /// The policy digest of PolicyPCR over the current values of `pcrs`.
    fn pcr_policy_digest(&mut self, pcrs: &[u8]) -> Result<Digest> {
        let mut concat = Vec::new();
        for p in pcrs {
            concat.extend_from_slice(&self.pcr_value(*p)?);
        }
        let pcr_digest =
            Digest::try_from(Sha256::digest(&concat).to_vec()).map_err(tpm_err("PCR digest"))?;
        let session = self.start_policy_session(SessionType::Trial)?;
        let result = (|| {
            let policy = PolicySession::try_from(session).map_err(tpm_err("trial session"))?;
            let selection = pcr_selection(pcrs)?;
            self.ctx
                .execute_without_session(|c| c.policy_pcr(policy, pcr_digest, selection))
                .map_err(tpm_err("PolicyPCR (trial)"))?;
            self.ctx
                .execute_without_session(|c| c.policy_get_digest(policy))
                .map_err(tpm_err("PolicyGetDigest"))
        })();
        self.flush_session(session);
        result
    }

    /// Extends a PCR (tests use it to simulate a changed boot chain).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub fn pcr_extend(&mut self, pcr: u8, data: &[u8]) -> Result<()> {
        let handle = tss_esapi::handles::PcrHandle::try_from(u32::from(pcr))
            .map_err(|_| KeyError::InvalidPcr(pcr))?;
        let mut vals = DigestValues::new();
        vals.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(Sha256::digest(data).to_vec()).map_err(tpm_err("digest"))?,
        );
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |c| c.pcr_extend(handle, vals))
            .map_err(tpm_err("PCR_Extend"))
    }

    /// NV indices defined in Leasehold's range (secrets and epoch counter).
    pub fn nv_indices(&mut self) -> Result<Vec<u32>> {
        let (data, _) = self
            .ctx
            .execute_without_session(|c| {
                c.get_capability(CapabilityType::Handles, NV_BASE, NV_SPAN + 1)
            })
            .map_err(tpm_err("GetCapability (NV handles)"))?;
        let CapabilityData::Handles(handles) = data else {
            return Err(KeyError::UnexpectedTpmResponse("capability data"));
        };
        Ok(handles
            .into_inner()
            .into_iter()
            .filter_map(|h| match h {
                TpmHandle::NvIndex(nv) => Some(u32::from(nv)),
                _ => None,
            })
            .filter(|h| (NV_BASE..=NV_EPOCH).contains(h))
            .collect())
    }

    /// Defines the epoch counter and increments it once (a counter can be
    /// read only once written; a new counter starts at the highest value any
    /// counter of this TPM has had, so it never goes back). Not orderly: an
    /// orderly counter may jump ahead after an unclean shutdown, and the
    /// epoch check needs exact values. Returns its value.
    pub fn epoch_define(&mut self) -> Result<u64> {
        let h = self.nv_define(
            NV_EPOCH,
            NvIndexType::Counter,
            8,
            "NV_DefineSpace (epoch counter)",
        )?;
        self.nv_close(h);
        self.epoch_increment()?;
        self.epoch_read()?.ok_or(KeyError::UnexpectedTpmResponse(
            "epoch counter missing after definition",
        ))
    }

    /// Defines an owner-read/write, dictionary-attack-exempt NV index of
    /// `kind` and `size` bytes (the epoch counter, generation secrets).
    fn nv_define(
        &mut self,
        index: u32,
        kind: NvIndexType,
        size: usize,
        op: &'static str,
    ) -> Result<NvIndexHandle> {
        let tpm_handle = NvIndexTpmHandle::new(index).map_err(tpm_err("NV handle"))?;
        let attrs = NvIndexAttributesBuilder::new()
            .with_nv_index_type(kind)
            .with_owner_write(true)
            .with_owner_read(true)
            .with_no_da(true)
            .build()
            .map_err(tpm_err("NV attributes"))?;
        let public = NvPublicBuilder::new()
            .with_nv_index(tpm_handle)
            .with_index_name_algorithm(HashingAlgorithm::Sha256)
            .with_index_attributes(attrs)
            .with_data_area_size(size)
            .build()
            .map_err(tpm_err("NV public"))?;
        self.authed(Enc::None, |c| {
            c.nv_define_space(Provision::Owner, None, public)
        })
        .map_err(tpm_err(op))
    }

    /// The epoch counter's value; `None` if it is not defined.
    pub fn epoch_read(&mut self) -> Result<Option<u64>> {
        if !self.nv_indices()?.contains(&NV_EPOCH) {
            return Ok(None);
        }
        let h = self.nv_handle(NV_EPOCH)?;
        let r = self
            .authed(Enc::None, |c| c.nv_read(NvAuth::Owner, h, 8, 0))
            .map_err(tpm_err("NV_Read (epoch counter)"));
        self.nv_close(h);
        let bytes: [u8; 8] = r?
            .value()
            .try_into()
            .map_err(|_| KeyError::UnexpectedTpmResponse("epoch counter of the wrong size"))?;
        Ok(Some(u64::from_be_bytes(bytes)))
    }

    /// Increments the epoch counter.
    pub fn epoch_increment(&mut self) -> Result<()> {
        let h = self.nv_handle(NV_EPOCH)?;
        let r = self
            .authed(Enc::None, |c| c.nv_increment(NvAuth::Owner, h))
            .map_err(tpm_err("NV_Increment (epoch counter)"));
        self.nv_close(h);
        r
    }

    /// Loads the signing key blob and returns the fingerprint of the public
    /// key the TPM reports for it.
    pub fn signing_fingerprint(&mut self, blob: &Blob, path: &std::path::Path) -> Result<String> {
        let h = self.load_as(blob, signing_key_unusable(path))?;
        let public = self.read_public_of(h)?;
        Ok(recipient_of(&public)?.fingerprint_hex())
    }

    fn nv_handle(&mut self, index: u32) -> Result<NvIndexHandle> {
        let tpm_handle = NvIndexTpmHandle::new(index).map_err(tpm_err("NV handle"))?;
        self.ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(tpm_handle)))
            .map(NvIndexHandle::from)
            .map_err(tpm_err("open NV index"))
    }

    fn nv_close(&mut self, h: NvIndexHandle) {
        let mut oh = ObjectHandle::from(h);
        if let Err(e) = self.ctx.tr_close(&mut oh) {
            tracing::warn!(error = %e, "could not close an NV handle");
        }
    }

    /// Defines the NV index holding a generation secret (replacing a stale one).
    pub fn nv_define_secret(&mut self, index: u32, secret: &GenerationSecret) -> Result<()> {
        if self.nv_indices()?.contains(&index) {
            self.nv_undefine(index)?;
        }
        let h = self.nv_define(
            index,
            NvIndexType::Ordinary,
            GenerationSecret::LEN,
            "NV_DefineSpace",
        )?;
        let data =
            MaxNvBuffer::try_from(secret.expose_secret().to_vec()).map_err(tpm_err("NV data"))?;
        let r = self
            .authed(Enc::In, |c| c.nv_write(NvAuth::Owner, h, data, 0))
            .map_err(tpm_err("NV_Write"));
        self.nv_close(h);
        r
    }

    /// Reads a generation secret; `None` if the index is not defined.
    pub fn nv_read_secret(&mut self, index: u32) -> Result<Option<GenerationSecret>> {
        if !self.nv_indices()?.contains(&index) {
            return Ok(None);
        }
        let h = self.nv_handle(index)?;
        let size = u16::try_from(GenerationSecret::LEN).unwrap_or(32);
        let r = self
            .authed(Enc::Out, |c| c.nv_read(NvAuth::Owner, h, size, 0))
            .map_err(tpm_err("NV_Read"));
        self.nv_close(h);
        let buf = r?;
        if buf.value().len() != GenerationSecret::LEN {
            return Err(KeyError::UnexpectedTpmResponse(
                "NV secret of the wrong size",
            ));
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes.copy_from_slice(buf.value());
        Ok(Some(GenerationSecret::from_zeroizing(&bytes)))
    }

    /// Undefines an NV index: everything depending on its secret is gone.
    pub fn nv_undefine(&mut self, index: u32) -> Result<()> {
        let h = self.nv_handle(index)?;
        self.authed(Enc::None, |c| c.nv_undefine_space(Provision::Owner, h))
            .map_err(tpm_err("NV_UndefineSpace"))
    }

    /// Flushes the primary and sends TPM2_Shutdown(CLEAR) so the TPM records
    /// an orderly shutdown (no dictionary-attack penalty on next start).
    pub fn shutdown(mut self) -> Result<()> {
        let primary = self.primary;
        let session = self.session;
        self.flushed = true;
        self.flush_session(session);
        self.flush(primary);
        self.ctx
            .execute_without_session(|c| c.shutdown(StartupType::Clear))
            .map_err(tpm_err("Shutdown"))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RsaUse {
    /// OAEP-SHA256 decryption only (the level key pairs).
    Decrypt,
    /// RSASSA-PKCS1-v1_5 SHA-256 signing only (the node signing key).
    Sign,
    /// Restricted RSASSA-PKCS1-v1_5 SHA-256 signing (the attestation key).
    Attest,
}

/// What `Tpm::quote` returns.
pub(crate) struct Quoted {
    /// Marshalled TPMS_ATTEST (what the signature covers).
    pub attest: Vec<u8>,
    /// RSASSA-PKCS1-v1_5 SHA-256 signature by the AK.
    pub signature: Vec<u8>,
    /// (PCR, sha256 value), ascending.
    pub pcr_values: Vec<(u8, Vec<u8>)>,
}

/// Template of an RSA-2048 key under the primary that can do exactly one
/// thing: a key never both decrypts and signs. Only the AK is restricted.
fn rsa_template(usage: RsaUse) -> tss_esapi::Result<Public> {
    let sign = usage != RsaUse::Decrypt;
    let restricted = usage == RsaUse::Attest;
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_decrypt(!sign)
        .with_sign_encrypt(sign)
        .with_restricted(restricted)
        .with_no_da(true)
        .build()?;
    let scheme = if sign {
        RsaScheme::RsaSsa(HashScheme::new(HashingAlgorithm::Sha256))
    } else {
        RsaScheme::Oaep(HashScheme::new(HashingAlgorithm::Sha256))
    };
    let params = PublicRsaParametersBuilder::new()
        .with_scheme(scheme)
        .with_key_bits(RsaKeyBits::Rsa2048)
        .with_exponent(RsaExponent::default())
        .with_is_decryption_key(!sign)
        .with_is_signing_key(sign)
        .with_restricted(restricted)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_rsa_parameters(params)
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
}

fn signing_key_unusable(path: &std::path::Path) -> impl Fn(tss_esapi::Error) -> KeyError + '_ {
    move |source| KeyError::SigningKeyUnusable {
        path: path.to_path_buf(),
        source,
    }
}

fn attestation_key_unusable(path: &std::path::Path) -> impl Fn(tss_esapi::Error) -> KeyError + '_ {
    move |source| KeyError::AttestationKeyUnusable {
        path: path.to_path_buf(),
        source,
    }
}

/// The fixed storage-primary template: ECC P-256, AES-128-CFB, restricted
/// decryption, in the owner hierarchy. The TPM derives the same key from it
/// at every start, so no persistent handle is needed.
fn primary_template() -> tss_esapi::Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_decrypt(true)
        .with_restricted(true)
        .with_no_da(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

fn pcr_selection(pcrs: &[u8]) -> Result<tss_esapi::structures::PcrSelectionList> {
    let slots = pcrs
        .iter()
        .map(|p| PcrSlot::try_from(1u32 << u32::from(*p)).map_err(|_| KeyError::InvalidPcr(*p)))
        .collect::<Result<Vec<_>>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(tpm_err("PCR selection"))
}

fn recipient_of(public: &Public) -> Result<RecipientKey> {
    let Public::Rsa {
        unique, parameters, ..
    } = public
    else {
        return Err(KeyError::UnexpectedTpmResponse("non-RSA public area"));
    };
    let e = match parameters.exponent().value() {
        0 => 65537,
        e => e,
    };
    RecipientKey::from_components(unique.value(), e).map_err(KeyError::from)
}
