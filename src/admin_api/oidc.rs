//! OIDC sign-in for teams with an identity provider: a Bearer JWT (any
//! token that is not an `sla_` admin token) is checked against the
//! provider's keys (a JWKS file), its issuer, audience and expiry; one
//! claim names the role and, for `tenant`, another the tenant.

use std::path::Path;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};

use crate::admin::tokens::Role;

/// What an OIDC sign-in needs; built once at start-up.
pub struct OidcVerifier {
    issuer: String,
    audience: String,
    keys: JwkSet,
    role_claim: String,
    tenant_claim: String,
}

/// A verified token: who, in which role, and a `tenant` role's tenant name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OidcIdentity {
    pub subject: String,
    pub role: Role,
    pub tenant: Option<String>,
}

/// Signatures by the provider's keys only: no `none`, no shared-secret HMAC
/// (whose "key" would be public in the JWKS).
const ALLOWED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

impl OidcVerifier {
    pub fn from_jwks_file(
        path: &Path,
        issuer: String,
        audience: String,
        role_claim: String,
        tenant_claim: String,
    ) -> Result<OidcVerifier, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let keys: JwkSet = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a JWKS: {e}", path.display()))?;
        if keys.keys.is_empty() {
            return Err(format!("{}: the JWKS has no keys", path.display()));
        }
        Ok(OidcVerifier {
            issuer,
            audience,
            keys,
            role_claim,
            tenant_claim,
        })
    }

    /// The identity a JWT carries, or why it is refused (for the log; the
    /// client is told only 401).
    pub fn verify(&self, token: &str) -> Result<OidcIdentity, String> {
        let header = decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        if !ALLOWED.contains(&header.alg) {
            return Err(format!("algorithm {:?} is not accepted", header.alg));
        }
        let jwk = match &header.kid {
            Some(kid) => self.keys.find(kid),
            None if self.keys.keys.len() == 1 => self.keys.keys.first(),
            None => None,
        }
        .ok_or("no key in the JWKS for the token's kid")?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("JWKS key: {e}"))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = decode::<serde_json::Value>(token, &key, &validation)
            .map_err(|e| format!("refused: {e}"))?
            .claims;
        let subject = claims["sub"].as_str().ok_or("no `sub` claim")?.to_owned();
        let role = claims[&self.role_claim]
            .as_str()
            .and_then(Role::parse)
            .ok_or_else(|| format!("no valid `{}` claim", self.role_claim))?;
        let tenant = match role {
            Role::Tenant => Some(
                claims[&self.tenant_claim]
                    .as_str()
                    .ok_or_else(|| format!("a tenant needs the `{}` claim", self.tenant_claim))?
                    .to_owned(),
            ),
            _ => None,
        };
        Ok(OidcIdentity {
            subject,
            role,
            tenant,
        })
    }
}
