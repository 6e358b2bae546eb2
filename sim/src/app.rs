//! A simulated application: writes random SQL straight into its node's file, in its own
//! transactions, and tells the oracle what each committed transaction did.

use crate::workload::Generator;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rusqlite::Connection;
use std::time::Duration;

use crate::world::{World, now};

pub(crate) async fn writer(world: World, i: usize) -> turmoil::Result {
    let (path, plan) = {
        let w = world.borrow();
        (w.dbs[i].clone(), w.plan.clone())
    };
    let conn = Connection::open(&path)?;
    let mut rng = ChaCha8Rng::seed_from_u64(plan.seed.wrapping_mul(31).wrapping_add(i as u64));
    let mut txn = 0;
    if let Some((late, at)) = plan.late_join
        && late == i
    {
        // The application of a node that joins late starts with it.
        tokio::time::sleep(at).await;
    }
    loop {
        let gap = plan.write_gap.as_millis() as u64;
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..=2 * gap))).await;
        if now() >= plan.chaos {
            break;
        }
        // Rows written before marmot first set itself up in the database are not published
        // (start every node from the same copy, the README says): the application starts
        // once its node did (a crash point can kill the very first start).
        if plan.generator != Generator::V1 && !world.borrow().set_up[i] {
            continue;
        }
        let effects = match plan.generator {
            Generator::V1 => {
                crate::workload::v1_transaction(&conn, &mut rng, i, txn, plan.hot_share)
                    .map_err(|e| format!("writer {}: {e}", i + 1))?
            }
            Generator::V2 | Generator::V3 | Generator::V4 | Generator::V5 => {
                // Now and then the application holds the write lock across a pause: marmot
                // meets SQLITE_BUSY in capture, apply, restores and snapshots meanwhile.
                let hold = plan.lock_holds && rng.random_bool(0.15);
                conn.execute_batch(if hold { "BEGIN IMMEDIATE" } else { "BEGIN" })?;
                let blind = world.borrow().blind[i];
                let ops = if matches!(plan.generator, Generator::V4 | Generator::V5) {
                    crate::workload::v4_operations(
                        &conn,
                        &mut rng,
                        i,
                        txn,
                        plan.hot_share,
                        plan.rebuild_share,
                        plan.schema_share,
                        blind,
                        plan.generator == Generator::V5,
                    )
                } else if plan.generator.changes_schema() {
                    crate::workload::v3_operations(
                        &conn,
                        &mut rng,
                        i,
                        txn,
                        plan.hot_share,
                        plan.rebuild_share,
                        plan.schema_share,
                        blind,
                    )
                } else {
                    crate::workload::v2_operations(
                        &conn,
                        &mut rng,
                        i,
                        txn,
                        plan.hot_share,
                        plan.rebuild_share,
                        blind,
                    )
                };
                let (effects, rebuilt) = match ops {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = conn.execute_batch("ROLLBACK");
                        return Err(format!("writer {}: {e}", i + 1).into());
                    }
                };
                if hold {
                    let pause = Duration::from_millis(rng.random_range(10..=400));
                    world.borrow_mut().trace.push(format!(
                        "{:?} app{} holds the write lock for {pause:?}",
                        now(),
                        i + 1
                    ));
                    tokio::time::sleep(pause).await;
                }
                conn.execute_batch("COMMIT")
                    .map_err(|e| format!("writer {}: {e}", i + 1))?;
                if rebuilt {
                    world.borrow_mut().blind[i] = true;
                }
                effects
            }
        };
        txn += 1;
        let mut w = world.borrow_mut();
        let t = format!(
            "{:?} app{} txn {} effects {}",
            now(),
            i + 1,
            txn,
            effects.len()
        );
        w.trace.push(t);
        // A transaction that changed no row fires no trigger: there is nothing to capture.
        if !effects.is_empty() {
            w.oracle.wrote(i, effects);
        }
        if let Some(tx) = w.wake[i].as_mut() {
            let _ = tx.try_send(());
        }
    }
    world.borrow_mut().writers_done += 1;
    Ok(())
}
