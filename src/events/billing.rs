//! Invoices: when a tenant's cycle closes (its end in the tenant's zone,
//! plus a grace for late events), the billing consumer writes the cycle's
//! invoice lines once (the plan's price, the requests included in its
//! quota, the overage at the plan's price per 1 000) and a `billing`
//! event. No payment provider: the lines are what one would consume.

use std::time::Duration;

use chrono::{NaiveDate, Utc};
use metrics::counter;
use sqlx::{PgConnection, PgPool};

use super::cycles;
use super::{outbox, BillingData, BillingLine, Event, Topic};
use crate::telemetry::names;

#[derive(sqlx::FromRow)]
struct Closing {
    tenant_id: String,
    cycle: NaiveDate,
    requests: i64,
    plan: String,
    monthly_quota: Option<i64>,
    monthly_price_cents: i64,
    overage_cents_per_1000: Option<i64>,
}

/// Closes due cycles every `every` until `shutdown`.
pub async fn close_cycles(
    pool: PgPool,
    grace: Duration,
    every: Duration,
    instance: String,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut failing = false;
    loop {
        match close_due(&pool, grace, &instance).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(invoices = n, "billing cycles closed");
                }
                if std::mem::take(&mut failing) {
                    tracing::info!("billing cycles closing again");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "cannot close billing cycles; retrying");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = &mut shutdown => return,
        }
    }
}

/// Writes the invoices of every cycle that ended more than `grace` ago
/// and has none; returns how many. Each in its own transaction; the
/// invoice's key (tenant, cycle) makes a second writer a no-op.
pub async fn close_due(
    pool: &PgPool,
    grace: Duration,
    instance: &str,
) -> Result<usize, sqlx::Error> {
    let due: Vec<Closing> = sqlx::query_as(
        "SELECT c.tenant_id::text AS tenant_id, c.cycle, c.requests, p.name AS plan,
                p.monthly_quota, coalesce(p.monthly_price_cents, 0) AS monthly_price_cents, p.overage_cents_per_1000
         FROM cycle_usage c
         JOIN tenants t ON t.id = c.tenant_id JOIN plans p ON p.name = t.plan
         WHERE c.consumer = 'billing'
           AND ((c.cycle + interval '1 month')::timestamp AT TIME ZONE t.time_zone)
               + make_interval(secs => $1) <= now()
           AND NOT EXISTS (SELECT 1 FROM invoices i
                           WHERE i.tenant_id = c.tenant_id AND i.cycle = c.cycle)
         ORDER BY c.cycle, c.tenant_id",
    )
    .bind(grace.as_secs_f64())
    .fetch_all(pool)
    .await?;
    let mut closed = 0;
    for c in due {
        let mut tx = pool.begin().await?;
        if close(&mut tx, &c, instance).await? {
            closed += 1;
        }
        tx.commit().await?;
    }
    Ok(closed)
}

/// The lines of a cycle: the plan's price, the requests within the quota,
/// and the overage (billed when the plan has a price for it).
pub fn lines(
    plan: &str,
    requests: i64,
    quota: Option<i64>,
    monthly_price_cents: i64,
    overage_cents_per_1000: Option<i64>,
) -> Vec<BillingLine> {
    let included = quota.map_or(requests, |q| requests.min(q));
    let mut lines = vec![
        BillingLine {
            kind: "subscription".into(),
            description: format!("plan {plan}"),
            quantity: 1,
            unit_price_cents: monthly_price_cents,
            amount_cents: monthly_price_cents,
        },
        BillingLine {
            kind: "included".into(),
            description: match quota {
                Some(q) => format!("requests within the quota of {q}"),
                None => "requests (no quota)".into(),
            },
            quantity: included,
            unit_price_cents: 0,
            amount_cents: 0,
        },
    ];
    let over = requests - included;
    if over > 0 {
        let price = overage_cents_per_1000.unwrap_or(0);
        // Rounded up to a cent over the cycle, not per request.
        let amount = (i128::from(over) * i128::from(price) + 999) / 1000;
        lines.push(BillingLine {
            kind: "overage".into(),
            description: "requests over the quota, per 1 000".into(),
            quantity: over,
            unit_price_cents: price,
            amount_cents: i64::try_from(amount).unwrap_or(i64::MAX),
        });
    }
    lines
}

async fn close(tx: &mut PgConnection, c: &Closing, instance: &str) -> Result<bool, sqlx::Error> {
    let lines = lines(
        &c.plan,
        c.requests,
        c.monthly_quota,
        c.monthly_price_cents,
        c.overage_cents_per_1000,
    );
    let total: i64 = lines.iter().map(|l| l.amount_cents).sum();
    let inserted = sqlx::query(
        "INSERT INTO invoices (tenant_id, cycle, plan, requests, total_cents)
         VALUES ($1::uuid, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(&c.tenant_id)
    .bind(c.cycle)
    .bind(&c.plan)
    .bind(c.requests)
    .bind(total)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Ok(false);
    }
    for (i, l) in lines.iter().enumerate() {
        sqlx::query(
            "INSERT INTO invoice_lines (tenant_id, cycle, line, kind, description, quantity,
                                        unit_price_cents, amount_cents)
             VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&c.tenant_id)
        .bind(c.cycle)
        .bind(i as i16 + 1)
        .bind(&l.kind)
        .bind(&l.description)
        .bind(l.quantity)
        .bind(l.unit_price_cents)
        .bind(l.amount_cents)
        .execute(&mut *tx)
        .await?;
    }
    let event = Event::new(
        Topic::Billing,
        instance,
        Utc::now(),
        BillingData {
            tenant_id: c.tenant_id.clone(),
            cycle: cycles::name(c.cycle),
            plan: c.plan.clone(),
            requests: c.requests.max(0) as u64,
            total_cents: total,
            lines,
        },
    );
    outbox::stage(&mut *tx, &event, &c.tenant_id).await?;
    counter!(names::INVOICES).increment(1);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_bill_overage_per_thousand_rounded_up_once() {
        let l = lines("startup", 1_000_001, Some(1_000_000), 4_900, Some(50));
        assert_eq!(l.len(), 3);
        assert_eq!(
            (l[0].kind.as_str(), l[0].amount_cents),
            ("subscription", 4_900)
        );
        assert_eq!((l[1].kind.as_str(), l[1].quantity), ("included", 1_000_000));
        assert_eq!(
            (l[2].kind.as_str(), l[2].quantity, l[2].amount_cents),
            ("overage", 1, 1)
        );
        let l = lines("startup", 1_250_000, Some(1_000_000), 0, Some(50));
        assert_eq!(l[2].amount_cents, 12_500);
        // Within the quota, or no quota: no overage line.
        assert_eq!(lines("free", 5, Some(100_000), 0, None).len(), 2);
        assert_eq!(
            lines("enterprise", 9_999_999, None, 100_000, None)[1].quantity,
            9_999_999
        );
    }
}
