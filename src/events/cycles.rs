//! Billing cycles: a tenant's requests per calendar month in its time
//! zone, as its quota is enforced and its usage reported.
//!
//! The alerts and billing consumers each keep their own totals in
//! `cycle_usage`, added to in the transaction that records the events'
//! ids, so a redelivered event is never counted twice.

use chrono::NaiveDate;
use sqlx::PgConnection;

use super::UsageData;

/// One tenant's cycle total moved by a batch: from `before` to `after`.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Moved {
    pub tenant_id: String,
    pub cycle: NaiveDate,
    pub before: i64,
    pub after: i64,
    /// The tenant's plan's monthly quota, if it has one.
    pub quota: Option<i64>,
}

/// Adds the allowed requests of `events` to `consumer`'s cycle totals
/// (cycles in each tenant's zone; the zone's offset is whole minutes, so a
/// minute lies in one cycle). Returns each total moved. Row locks order
/// concurrent replicas: their `before..after` ranges never overlap.
pub async fn add(
    tx: &mut PgConnection,
    consumer: &str,
    events: &[&UsageData],
) -> Result<Vec<Moved>, sqlx::Error> {
    let events: Vec<_> = events.iter().filter(|e| e.allowed > 0).collect();
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let tenants: Vec<&str> = events.iter().map(|e| e.tenant_id.as_str()).collect();
    let minutes: Vec<_> = events.iter().map(|e| e.minute).collect();
    let allowed: Vec<i64> = events
        .iter()
        .map(|e| i64::try_from(e.allowed).unwrap_or(i64::MAX))
        .collect();
    sqlx::query_as(
        "WITH u AS (
             SELECT t.id AS tenant_id,
                    date_trunc('month', u.minute AT TIME ZONE t.time_zone)::date AS cycle,
                    sum(u.allowed)::int8 AS n
             FROM UNNEST($2::text[], $3::timestamptz[], $4::int8[]) AS u(tenant_id, minute, allowed)
             JOIN tenants t ON t.id = u.tenant_id::uuid
             GROUP BY 1, 2
         ), up AS (
             INSERT INTO cycle_usage (consumer, tenant_id, cycle, requests)
             SELECT $1, tenant_id, cycle, n FROM u
             ON CONFLICT (consumer, tenant_id, cycle) DO UPDATE
             SET requests = cycle_usage.requests + EXCLUDED.requests
             RETURNING tenant_id, cycle, requests
         )
         SELECT up.tenant_id::text AS tenant_id, up.cycle, up.requests - u.n AS before,
                up.requests AS after, p.monthly_quota AS quota
         FROM up JOIN u USING (tenant_id, cycle)
         JOIN tenants t ON t.id = up.tenant_id JOIN plans p ON p.name = t.plan
         ORDER BY 1, 2",
    )
    .bind(consumer)
    .bind(tenants)
    .bind(minutes)
    .bind(allowed)
    .fetch_all(&mut *tx)
    .await
}

/// The thresholds (percent of the quota) that alert.
pub const THRESHOLDS: [u8; 3] = [80, 90, 100];

/// The thresholds a total crossed moving from `before` to `after`: the
/// first request that reaches a threshold's share of the quota crosses it.
pub fn crossed(before: i64, after: i64, quota: i64) -> Vec<u8> {
    THRESHOLDS
        .into_iter()
        .filter(|&t| {
            // ceil(quota * t / 100) requests reach t percent.
            let mark = (i128::from(quota) * i128::from(t) + 99) / 100;
            i128::from(before) < mark && mark <= i128::from(after)
        })
        .collect()
}

/// `YYYY-MM`, the name of the cycle that starts on `first`.
pub fn name(first: NaiveDate) -> String {
    first.format("%Y-%m").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_is_crossed_once_by_the_request_that_reaches_it() {
        assert_eq!(crossed(0, 79, 100), Vec::<u8>::new());
        assert_eq!(crossed(0, 80, 100), vec![80]);
        assert_eq!(crossed(80, 89, 100), Vec::<u8>::new());
        assert_eq!(crossed(79, 100, 100), vec![80, 90, 100]);
        assert_eq!(crossed(100, 500, 100), Vec::<u8>::new());
        // 80 % of 7 is 5.6: the 6th request reaches it.
        assert_eq!(crossed(0, 5, 7), Vec::<u8>::new());
        assert_eq!(crossed(5, 6, 7), vec![80]);
        // Adjacent batches never both cross one threshold.
        for quota in [1, 3, 7, 10, 1_000_000] {
            let mut seen = Vec::new();
            let mut total = 0;
            for step in [1, 2, 3, 5, 8, 13, 21, 34, 1_000_000] {
                seen.extend(crossed(total, total + step, quota));
                total += step;
            }
            assert_eq!(seen, THRESHOLDS.to_vec(), "quota {quota}");
        }
    }
}
