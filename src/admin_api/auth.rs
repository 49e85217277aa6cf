//! Who is calling: a Bearer admin token, checked against its keyed hash in
//! PostgreSQL on every request (so a revocation is in force at once), and
//! what its role lets it do. Failed sign-ins are counted per source address
//! by sluice's own limiter core and in-process store: past the limit, the
//! address is refused before its token is even looked at.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, Method};
use axum::serve::IncomingStream;
use tokio::net::TcpListener;

use super::error::ApiError;
use super::oidc::OidcVerifier;
use super::{AdminState, TlsListener};
use crate::admin::audit::{self, NewEntry};
use crate::admin::tokens::{self, Identity, Role};
use crate::clock::Clock;
use crate::limiter::{Algorithm, CounterOp, CounterSpec, Entry, KeyHasher};
use crate::storage::memory::MemoryStore;

/// The client's address, from the connection (plain or TLS).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

// === Failed sign-ins ===

/// Failed sign-ins per source address: `limit` per `period`, a fixed window
/// in an in-process store (counters die with the process, which is fine
/// for slowing down guessing).
pub struct FailedAuthLimiter {
    store: MemoryStore,
    hasher: KeyHasher,
    spec: CounterSpec,
    clock: Arc<dyn Clock>,
}

const FAILED_AUTH_DOMAIN: &str = "sluice-admin";

impl FailedAuthLimiter {
    pub fn new(
        limit: u32,
        period: std::time::Duration,
        clock: Arc<dyn Clock>,
    ) -> FailedAuthLimiter {
        let period_us = u64::try_from(period.as_micros())
            .unwrap_or(u64::MAX)
            .max(1_000_000);
        FailedAuthLimiter {
            store: MemoryStore::new(100_000, clock.clone()),
            hasher: KeyHasher::random(),
            spec: CounterSpec {
                algorithm: Algorithm::FixedWindow,
                limit: u64::from(limit.max(1)),
                period_us,
                burst: 0,
                calendar: None,
            },
            clock,
        }
    }

    fn op(&self, ip: IpAddr, hits: u64) -> CounterOp {
        let value = ip.to_string();
        let entries = [Entry {
            key: "failed_auth_source",
            value: &value,
        }];
        CounterOp {
            key: self.hasher.counter_key(
                FAILED_AUTH_DOMAIN,
                &entries,
                &[],
                self.spec.algorithm,
                self.spec.period_us / 1_000_000,
            ),
            spec: self.spec,
            hits,
        }
    }

    /// Seconds until `ip` may try again, if it has used up its failures.
    pub fn blocked(&self, ip: IpAddr) -> Option<u64> {
        // hits 0 reads the counter without counting.
        let outcome = self
            .store
            .apply_one(&self.op(ip, 0), self.clock.now_us())
            .ok()?;
        (outcome.remaining == 0).then(|| outcome.reset_us.div_ceil(1_000_000))
    }

    pub fn record_failure(&self, ip: IpAddr) {
        if let Err(e) = self.store.apply_one(&self.op(ip, 1), self.clock.now_us()) {
            tracing::warn!(error = %e, "counting a failed admin sign-in failed");
        }
    }
}

// === The caller ===

/// An authenticated caller and where it called from.
#[derive(Clone, Debug)]
pub struct Caller {
    pub identity: Identity,
    pub source: SocketAddr,
}

impl FromRequestParts<AdminState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, ApiError> {
        let source = parts
            .extensions
            .get::<ConnectInfo<Peer>>()
            .map(|c| c.0 .0)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let ip = source.ip();
        if let Some(wait) = state.failures.blocked(ip) {
            return Err(ApiError::too_many_failures(wait));
        }
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "missing `Authorization: Bearer <token>`",
            ));
        };
        // JWTs run to a few kilobytes; admin tokens are 61 bytes.
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 16 * 1024);
        let identity = match (token, &state.oidc) {
            (Some(token), _) if token.starts_with("sla_") => {
                tokens::authenticate(&state.pool, &state.hasher, token).await?
            }
            (Some(token), Some(oidc)) => oidc_identity(state, oidc, token).await?,
            _ => None,
        };
        match identity {
            Some(identity) => Ok(Caller { identity, source }),
            None => {
                state.failures.record_failure(ip);
                Err(ApiError::unauthorized(
                    "unknown, expired or revoked token (expected `Bearer <token>`)",
                ))
            }
        }
    }
}

/// The identity of a verified OIDC token; `None` if it is refused or names
/// a tenant that does not exist.
async fn oidc_identity(
    state: &AdminState,
    oidc: &OidcVerifier,
    token: &str,
) -> Result<Option<Identity>, ApiError> {
    let verified = match oidc.verify(token) {
        Ok(v) => v,
        Err(reason) => {
            tracing::info!(%reason, "admin API: OIDC token refused");
            return Ok(None);
        }
    };
    let tenant = match &verified.tenant {
        None => None,
        Some(name) => match crate::admin::get_tenant(&state.pool, name).await {
            Ok(t) => Some((t.id, t.name)),
            Err(crate::admin::AdminError::NoSuchTenant(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        },
    };
    Ok(Some(Identity {
        actor: format!("oidc:{}", verified.subject),
        role: verified.role,
        tenant,
    }))
}

impl Caller {
    pub fn role(&self) -> Role {
        self.identity.role
    }

    /// Refuses unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.contains(&self.identity.role) {
            return Ok(());
        }
        let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        Err(ApiError::forbidden(format!(
            "this needs the role {} (the token's role is {})",
            names.join(" or "),
            self.identity.role.as_str()
        )))
    }

    /// Admins and operators.
    pub fn staff(&self) -> Result<(), ApiError> {
        self.require(&[Role::Admin, Role::Operator])
    }

    /// Refuses a `tenant` token any tenant but its own.
    pub fn may_see_tenant(&self, name: &str) -> Result<(), ApiError> {
        match (&self.identity.role, &self.identity.tenant) {
            (Role::Tenant, Some((_, own))) if own == name => Ok(()),
            (Role::Tenant, _) => Err(ApiError::forbidden(
                "a tenant token sees only its own tenant",
            )),
            _ => Ok(()),
        }
    }

    /// Appends a change to the audit log. A change made is reported even if
    /// its audit entry cannot be written; that failure is logged.
    #[allow(clippy::too_many_arguments)]
    pub async fn audit(
        &self,
        state: &AdminState,
        method: Method,
        route: &str,
        object: &str,
        before: Option<serde_json::Value>,
        after: Option<serde_json::Value>,
        status: u16,
    ) {
        let source = self.source.ip().to_string();
        let entry = NewEntry {
            actor: &self.identity.actor,
            role: self.identity.role.as_str(),
            actor_tenant_id: self.identity.tenant.as_ref().map(|(id, _)| id.as_str()),
            method: method.as_str(),
            route,
            object,
            before,
            after,
            status,
            source: &source,
        };
        if let Err(e) = audit::append(&state.pool, &entry).await {
            tracing::error!(error = %e, route, object, "writing the audit log failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn failures_are_counted_per_address_until_the_window_ends() {
        let clock = Arc::new(ManualClock::new(1_000_000_000_000));
        let limiter = FailedAuthLimiter::new(3, std::time::Duration::from_secs(60), clock.clone());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(limiter.blocked(a), None);
            limiter.record_failure(a);
        }
        let wait = limiter.blocked(a).expect("blocked after 3 failures");
        assert!((1..=60).contains(&wait), "{wait}");
        assert_eq!(limiter.blocked(b), None, "another address is not blocked");
        clock.advance(61_000_000);
        assert_eq!(limiter.blocked(a), None, "still blocked after the window");
    }
}
