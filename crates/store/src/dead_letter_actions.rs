//! Acting on dead letters in PostgreSQL: selecting them, taking one for replay (one caller
//! wins), recording the replay or putting it back, discarding, and the audit records. The
//! order of the steps (and why a crash between them loses nothing) is described in the API's
//! `dead_letters` module, which drives them.

use crate::{
    dead_letters::{push_filter, DeadLetterFilter, REPLAY_TAKEOVER_AFTER},
    errors::{db_err, StoreError},
    pool::Store,
};
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

/// What [`Store::begin_replay`] found.
#[derive(Debug, Clone)]
pub enum BeginReplay {
    /// Taken (`replaying`): publish it as replay number `replay`, then [`Store::finish_replay`].
    /// `published` is true when a replayer that died had already published this very replay
    /// (the worker has since picked it up): only the record is left to write.
    Taken { job: ReplayJob, published: bool },
    /// Still dead, but replayed `replays` times already (the limit).
    Refused { replays: i32 },
    /// Not a dead letter (unknown, replayed, discarded, or being replayed by another caller).
    NotFound,
}

/// A dead letter taken for replay.
#[derive(Debug, Clone)]
pub struct ReplayJob {
    pub id: Uuid,
    pub notification_id: Option<Uuid>,
    pub channel: String,
    pub body: Vec<u8>,
    pub properties: serde_json::Value,
    /// The number this replay carries (`x-notify-replays`).
    pub replay: i32,
}

/// An audit record of a replay or discard.
#[derive(Debug, Clone)]
pub struct DeadLetterAction<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub dry_run: bool,
    pub selector: serde_json::Value,
    pub matched: i32,
    pub done: i32,
    pub ids: &'a [Uuid],
}

impl Store {
    /// Ids of up to `limit` dead letters matching `filter` that a replay or discard may take
    /// now: `dead` ones, and `replaying` ones abandoned for [`REPLAY_TAKEOVER_AFTER`]; oldest
    /// first (the order they died in).
    pub async fn select_dead_letters(&self, filter: &DeadLetterFilter, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        let mut q = QueryBuilder::<Postgres>::new("SELECT id FROM dead_letters");
        push_filter(&mut q, filter);
        q.push(" AND (status = 'dead' OR status_at < now() - make_interval(secs => ")
            .push_bind(REPLAY_TAKEOVER_AFTER.as_secs_f64())
            .push("))");
        q.push(" ORDER BY dead_at, id LIMIT ").push_bind(limit.max(0));
        q.build_query_scalar().fetch_all(self.pool()).await.map_err(db_err)
    }

    /// Of `ids`, those a replay or discard may take now (see [`Store::select_dead_letters`]).
    pub async fn takeable_dead_letters(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        sqlx::query_scalar(
            "SELECT id FROM dead_letters WHERE id = ANY($1)
                AND (status = 'dead' OR (status = 'replaying' AND status_at < now() - make_interval(secs => $2)))
              ORDER BY dead_at, id",
        )
        .bind(ids)
        .bind(REPLAY_TAKEOVER_AFTER.as_secs_f64())
        .fetch_all(self.pool())
        .await
        .map_err(db_err)
    }

    /// Takes one dead letter for replay: `dead` → `replaying` (a conditional update, so of
    /// concurrent callers exactly one gets it), refused when it was replayed `limit` times
    /// already. In the same transaction the delivery record is made claimable again: `queued`,
    /// attempts and crash count reset, `replays` set, so the worker's send guard lets the
    /// replay send once (and still stops a broker redelivery of it after it was delivered).
    pub async fn begin_replay(&self, id: Uuid, limit: i32) -> Result<BeginReplay, StoreError> {
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        let taken = sqlx::query(
            "UPDATE dead_letters SET status = 'replaying', status_at = now()
              WHERE id = $1 AND replays < $2
                AND (status = 'dead' OR (status = 'replaying' AND status_at < now() - make_interval(secs => $3)))
              RETURNING notification_id, channel, body, properties, replays",
        )
        .bind(id)
        .bind(limit)
        .bind(REPLAY_TAKEOVER_AFTER.as_secs_f64())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        let Some(row) = taken else {
            drop(tx);
            let state: Option<(String, i32, bool)> = sqlx::query_as(
                "SELECT status, replays, status_at < now() - make_interval(secs => $2) FROM dead_letters WHERE id = $1",
            )
            .bind(id)
            .bind(REPLAY_TAKEOVER_AFTER.as_secs_f64())
            .fetch_optional(self.pool())
            .await
            .map_err(db_err)?;
            return Ok(match state {
                Some((status, replays, stale)) if status == "dead" || (status == "replaying" && stale) => {
                    BeginReplay::Refused { replays }
                }
                _ => BeginReplay::NotFound,
            });
        };
        let notification_id: Option<Uuid> = row.try_get("notification_id").map_err(db_err)?;
        let channel: String = row.try_get("channel").map_err(db_err)?;
        let replay = row.try_get::<i32, _>("replays").map_err(db_err)? + 1;
        let mut published = false;
        if let Some(nid) = notification_id {
            // A record already carrying this replay's number and moved on by a worker means a
            // replayer that died had published it: publishing again would make two copies.
            let seen: Option<(String, i32)> = sqlx::query_as(
                "SELECT status, replays FROM deliveries WHERE notification_id = $1 AND channel = $2 FOR UPDATE",
            )
            .bind(nid)
            .bind(&channel)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
            published = matches!(&seen, Some((status, n)) if *n == replay && status != "queued");
            if !published {
                sqlx::query(
                    "UPDATE deliveries SET status = 'queued', attempts = 0, crashes = 0, claimed_by = NULL,
                            replays = $3, updated_at = now()
                      WHERE notification_id = $1 AND channel = $2 AND status <> 'delivered'",
                )
                .bind(nid)
                .bind(&channel)
                .bind(replay)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            }
        }
        tx.commit().await.map_err(db_err)?;
        let job = ReplayJob {
            id,
            notification_id,
            channel,
            body: row.try_get("body").map_err(db_err)?,
            properties: row.try_get("properties").map_err(db_err)?,
            replay,
        };
        Ok(BeginReplay::Taken { job, published })
    }

    /// The replay was published (confirmed): the dead letter is `replayed`, with its number.
    pub async fn finish_replay(&self, job: &ReplayJob) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE dead_letters SET status = 'replayed', replays = $2, status_at = now()
              WHERE id = $1 AND status = 'replaying'",
        )
        .bind(job.id)
        .bind(job.replay)
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// The replay could not be published: the dead letter is `dead` again, and so is its
    /// delivery record (unless a worker moved it on meanwhile).
    pub async fn abort_replay(&self, job: &ReplayJob) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        sqlx::query(
            "UPDATE dead_letters SET status = 'dead', status_at = now() WHERE id = $1 AND status = 'replaying'",
        )
        .bind(job.id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if let Some(nid) = job.notification_id {
            sqlx::query(
                "UPDATE deliveries SET status = 'dead', replays = $3 - 1, updated_at = now()
                  WHERE notification_id = $1 AND channel = $2 AND status = 'queued' AND replays = $3",
            )
            .bind(nid)
            .bind(&job.channel)
            .bind(job.replay)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }

    /// Discards those of `ids` that are takeable (see [`Store::takeable_dead_letters`]): status
    /// `discarded`, never listed or replayed again. Returns the ids discarded.
    pub async fn discard_dead_letters(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        sqlx::query_scalar(
            "UPDATE dead_letters SET status = 'discarded', status_at = now()
              WHERE id = ANY($1)
                AND (status = 'dead' OR (status = 'replaying' AND status_at < now() - make_interval(secs => $2)))
              RETURNING id",
        )
        .bind(ids)
        .bind(REPLAY_TAKEOVER_AFTER.as_secs_f64())
        .fetch_all(self.pool())
        .await
        .map_err(db_err)
    }

    /// Writes the audit record of a replay or discard.
    pub async fn record_dead_letter_action(&self, a: &DeadLetterAction<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO dead_letter_actions (id, actor, action, dry_run, selector, matched, done, ids)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(Uuid::now_v7())
        .bind(a.actor)
        .bind(a.action)
        .bind(a.dry_run)
        .bind(&a.selector)
        .bind(a.matched)
        .bind(a.done)
        .bind(a.ids)
        .execute(self.pool())
        .await
        .map_err(db_err)?;
        Ok(())
    }
}
