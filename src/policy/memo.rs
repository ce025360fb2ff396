//! Per-session memos in front of the engine's shared caches: a session's identity never
//! changes, so what it was served can be kept by text (or shape) alone, without locks or the
//! claims key. Bounded so that a session sending endless distinct statements costs little.
use std::collections::HashMap;
use std::sync::Arc;

use super::shape::Shape;
use super::{inc, RewriteCounters, Rewritten, ShapeTemplate};

/// Most entries one memo map holds; a full map starts over (sessions of real applications
/// cycle through far fewer statements).
const MEMO_CAPACITY: usize = 128;
/// Longer keys are not remembered (the engine's caches still serve them).
const MEMO_KEY_LIMIT: usize = 2048;

/// A small map of one session's statements by text or shape key, within the bounds above.
pub(crate) struct BoundedMap<V>(HashMap<String, V>);

impl<V> Default for BoundedMap<V> {
    fn default() -> Self {
        BoundedMap(HashMap::new())
    }
}

impl<V> BoundedMap<V> {
    pub(crate) fn get(&self, key: &str) -> Option<&V> {
        self.0.get(key)
    }

    pub(crate) fn insert(&mut self, key: &str, value: V) {
        if key.len() > MEMO_KEY_LIMIT {
            return;
        }
        if self.0.len() >= MEMO_CAPACITY {
            self.0.clear();
        }
        self.0.insert(key.to_string(), value);
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// How a rewrite may be served again to the same identity.
pub(super) enum Reuse {
    /// Any statement of the same shape: fill this template.
    Template(Arc<ShapeTemplate>),
    /// The same text: the same result.
    Exact,
    /// Never (it embeds ciphertext, or nothing was rewritten).
    None,
}

/// One session's memo of the rewrites it used, for [`super::PolicyEngine::rewrite_in_session`].
/// Emptied whenever the engine's policies, catalog or encryption change (its generation).
#[derive(Default)]
pub struct SessionMemo {
    pub(super) generation: u64,
    pub(super) shapes: BoundedMap<Arc<ShapeTemplate>>,
    pub(super) exact: BoundedMap<Arc<Rewritten>>,
    counters: Arc<RewriteCounters>,
}

impl SessionMemo {
    pub(super) fn reset(&mut self, generation: u64, counters: Arc<RewriteCounters>) {
        self.generation = generation;
        self.shapes.clear();
        self.exact.clear();
        self.counters = counters;
    }

    pub(super) fn get(&self, sql: &str, shape: Option<&Shape<'_>>) -> Option<Arc<Rewritten>> {
        if let Some(shape) = shape {
            if let Some(t) = self.shapes.get(shape.key()) {
                inc(&self.counters.shape_hits);
                return Some(Arc::new(t.instantiate(shape)));
            }
        }
        let hit = self.exact.get(sql)?;
        inc(&self.counters.exact_hits);
        Some(hit.clone())
    }

    pub(super) fn remember(
        &mut self,
        sql: &str,
        shape: Option<&Shape<'_>>,
        rewritten: &Arc<Rewritten>,
        reuse: Reuse,
    ) {
        match (reuse, shape) {
            (Reuse::Template(t), Some(shape)) => self.shapes.insert(shape.key(), t),
            (Reuse::Exact, _) => self.exact.insert(sql, rewritten.clone()),
            _ => {}
        }
    }
}
