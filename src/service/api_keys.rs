//! Finding the API key in a request's descriptors: hash it, look it up in
//! the rules snapshot (in memory; never a query per request).

use metrics::counter;

use crate::limiter::RuleSet;
use crate::limiter::{Caller, KeyHasher, Request};
use crate::telemetry::names;

/// What a request with an unknown or revoked API key gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownKey {
    /// OVER_LIMIT for the descriptor that carries it.
    Deny,
    /// The domain's own rules, as for a caller without a key.
    Anonymous,
}

#[derive(Clone, Debug)]
pub struct ApiKeyPolicy {
    /// The descriptor entry key that carries an API key, e.g. `api_key`.
    pub descriptor: String,
    pub unknown: UnknownKey,
}

impl ApiKeyPolicy {
    /// One caller per descriptor: the first entry named `descriptor` holds
    /// the key; descriptors without one are anonymous.
    pub fn callers<'r>(
        &self,
        request: &Request<'_>,
        rules: &'r RuleSet,
        hasher: &KeyHasher,
    ) -> Vec<Caller<'r>> {
        request
            .descriptors
            .iter()
            .map(|d| {
                let Some(entry) = d.entries.iter().find(|e| e.key == self.descriptor) else {
                    return Caller::Anonymous;
                };
                match rules.api_key(&hasher.api_key(entry.value)) {
                    Some(key) => {
                        counter!(names::API_KEY_LOOKUPS, "result" => "known").increment(1);
                        Caller::Key(key)
                    }
                    None => {
                        counter!(names::API_KEY_LOOKUPS, "result" => "unknown").increment(1);
                        match self.unknown {
                            UnknownKey::Deny => Caller::Refused,
                            UnknownKey::Anonymous => Caller::Anonymous,
                        }
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::ApiKey;
    use crate::limiter::Descriptor;

    fn request<'a>(descriptors: &[&[(&'a str, &'a str)]]) -> Request<'a> {
        Request {
            domain: "d",
            descriptors: descriptors
                .iter()
                .map(|pairs| Descriptor::new(pairs.iter().copied(), None, None))
                .collect(),
            hits: 1,
        }
    }

    #[test]
    fn keys_are_found_by_hash_and_unknown_ones_follow_the_policy() {
        let hasher = KeyHasher::from_secret(b"s");
        let mut rules = RuleSet::new();
        rules.insert_api_key(
            &hasher.api_key("good"),
            ApiKey {
                tenant_id: "t".into(),
                tenant: "acme".into(),
                plan: "free".into(),
                monthly_quota: None,
                time_zone: chrono_tz::Tz::UTC,
            },
        );
        let req = request(&[
            &[("route", "/"), ("api_key", "good")],
            &[("api_key", "bad")],
            &[("ip", "1")],
        ]);
        let mut policy = ApiKeyPolicy {
            descriptor: "api_key".into(),
            unknown: UnknownKey::Deny,
        };
        let callers = policy.callers(&req, &rules, &hasher);
        assert!(matches!(callers[0], Caller::Key(k) if &*k.tenant == "acme"));
        assert!(matches!(callers[1], Caller::Refused));
        assert!(matches!(callers[2], Caller::Anonymous));
        policy.unknown = UnknownKey::Anonymous;
        assert!(matches!(
            policy.callers(&req, &rules, &hasher)[1],
            Caller::Anonymous
        ));
    }
}
