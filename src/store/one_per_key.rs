//! PostgreSQL: one statement per key at a time on this instance, for statements that
//! wait on a row of their key while another transaction holds it.
//!
//! Logins of one email queue on its counter's row while another login of it commits
//! (through its WAL flush), and a user's session writes queue on the user's row. Each
//! waiting statement holds one of a few connections, so a burst of logins of one email
//! (a bot, a client retrying) could hold every connection of its set and make every
//! other email's login wait for one. Here the statements of one key wait their turn in
//! this process, without a connection: only the first of them waits on the row. (Each
//! instance lets one through, so with n instances up to n connections may wait on one
//! row.) The database's lock still does the work of keeping the count exact.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as Turn, OwnedMutexGuard};

/// Beyond this many keys, entries that nobody holds or waits for are swept out.
const SWEEP_ABOVE: usize = 1024;

/// The turns of each key in use.
#[derive(Default)]
pub struct OnePerKey {
    turns: Mutex<HashMap<String, Arc<Turn<()>>>>,
}

/// A key's turn, held until dropped.
pub struct KeyTurn<'a> {
    owner: &'a OnePerKey,
    key: String,
    turn: Option<OwnedMutexGuard<()>>,
}

impl OnePerKey {
    fn turns(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Turn<()>>>> {
        // The map stays consistent across a panic (each change is one call).
        self.turns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for `key`'s turn.
    pub async fn take(&self, key: &str) -> KeyTurn<'_> {
        let turn = {
            let mut turns = self.turns();
            if turns.len() > SWEEP_ABOVE {
                // A waiter that was cancelled leaves its key's entry behind.
                turns.retain(|_, t| Arc::strong_count(t) > 1);
            }
            turns.entry(key.to_owned()).or_default().clone()
        };
        let turn = turn.lock_owned().await;
        KeyTurn { owner: self, key: key.to_owned(), turn: Some(turn) }
    }

    /// Keys with an entry (held, waited for or not yet swept).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.turns().len()
    }
}

impl Drop for KeyTurn<'_> {
    fn drop(&mut self) {
        let mut turns = self.owner.turns();
        drop(self.turn.take());
        // Nobody else holds or waits for it: the map's is the last reference.
        if turns.get(&self.key).is_some_and(|t| Arc::strong_count(t) == 1) {
            turns.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_key_waits_its_turn_and_other_keys_do_not() {
        let gate = Arc::new(OnePerKey::default());
        let first = gate.take("a").await;
        // Another key goes at once.
        let other = tokio::time::timeout(Duration::from_millis(100), gate.take("b")).await;
        assert!(other.is_ok(), "another key waited for a's turn");
        drop(other);
        // The same key waits until the first turn ends.
        let g = gate.clone();
        let second = tokio::spawn(async move {
            let _t = g.take("a").await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "a second turn of a began while the first was held");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), second).await.unwrap().unwrap();
        assert_eq!(gate.len(), 0, "an entry outlived its last turn");
    }

    #[tokio::test]
    async fn an_entry_left_by_a_cancelled_waiter_is_swept() {
        let gate = OnePerKey::default();
        let held = gate.take("a").await;
        let mut waiter = Box::pin(gate.take("a"));
        assert!(tokio::time::timeout(Duration::from_millis(20), &mut waiter).await.is_err());
        // The holder leaves while the waiter still counts, then the waiter is cancelled.
        drop(held);
        drop(waiter);
        assert!(gate.turns().contains_key("a"));
        let many: Vec<_> = take_all((0..SWEEP_ABOVE).map(|i| i.to_string()), &gate).await;
        assert!(gate.turns().contains_key("a"), "swept before the map grew large");
        let one_more = gate.take("x").await;
        assert!(!gate.turns().contains_key("a"), "the entry nobody held stayed");
        drop(one_more);
        drop(many);
        assert_eq!(gate.len(), 0);
    }

    async fn take_all(keys: impl Iterator<Item = String>, gate: &OnePerKey) -> Vec<KeyTurn<'_>> {
        let mut held = Vec::new();
        for k in keys {
            held.push(gate.take(&k).await);
        }
        held
    }
}
