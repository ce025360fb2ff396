//! How the parameters a client binds become the parameters the server sees: the plan the
//! relay follows at Bind (encrypt, blind-index, add, bind to a row), and its bookkeeping
//! while one text is transformed.
use std::collections::HashMap;
use std::sync::Arc;

use super::{refuse, ColumnRef, Refused, RowKey};

/// What the relay does with one bound parameter value on its way upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamUse {
    /// Forwarded as the client sent it.
    Plain,
    /// Replaced by the ciphertext of the value, in binary format.
    Encrypt(ColumnRef),
    /// Replaced by the blind index of the value, in binary format.
    BlindIndex(ColumnRef),
    /// Added by pgward next to a searched [`ParamUse::BlindIndex`]: the value's blind index
    /// under the index root being replaced while a rotation is in progress, else the same
    /// index again.
    PreviousBlindIndex(ColumnRef),
}

/// How the parameters the server sees are made from the parameters the client binds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParamPlan {
    /// Parameters the client binds (`$1..$client_count`).
    pub client_count: usize,
    /// Per server-side parameter: which client parameter (0-based) supplies it, and how.
    /// Parameters beyond `client_count` are added by pgward (blind indexes of an inserted value).
    pub params: Vec<(usize, ParamUse)>,
    /// `COPY … FROM STDIN` into a table with encrypted columns: how its rows are encrypted.
    pub copy: Option<CopyPlan>,
    /// Encrypted parameters sealed row-bound (`bind_primary_key`): the client parameter
    /// (0-based) of the value, and where its row's primary key comes from.
    pub row_keys: Vec<(usize, RowKey)>,
    /// Result columns pgward appended (row keys, see `rowkey.rs`): a Bind naming one
    /// result format per column gets a text format for each.
    pub result_keys: usize,
}

/// How the rows of a `COPY … FROM STDIN` (text or CSV) are encrypted on their way upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyPlan {
    pub csv: bool,
    pub delimiter: u8,
    /// The string that means NULL (`\N` in text format, empty in CSV by default).
    pub null: String,
    pub header: bool,
    pub quote: u8,
    pub escape: u8,
    /// Per field of a row: the encrypted column it fills, if any.
    pub fields: Vec<Option<ColumnRef>>,
    /// Fields pgward appends: the blind index of field `i` (column list extended to match).
    pub blind_indexes: Vec<usize>,
    /// Names of the appended columns (for a header line).
    pub appended_names: Vec<String>,
}

impl ParamPlan {
    /// True when some value is sealed, blind-indexed or bound to a row on its way upstream
    /// (not merely a result column added).
    pub fn transforms_values(&self) -> bool {
        self.copy.is_some()
            || !self.row_keys.is_empty()
            || self.params.iter().any(|(_, u)| *u != ParamUse::Plain)
    }

    /// True when some parameter needs work in the relay.
    pub fn is_active(&self) -> bool {
        self.copy.is_some()
            || self.result_keys > 0
            || !self.row_keys.is_empty()
            || self.params.len() != self.client_count
            || self.params.iter().any(|(_, u)| *u != ParamUse::Plain)
    }

    /// Where the row key of client parameter `i` (an encrypted value) comes from, if it is
    /// sealed row-bound.
    pub fn row_key(&self, i: usize) -> Option<&RowKey> {
        self.row_keys
            .iter()
            .find(|(index, _)| *index == i)
            .map(|(_, key)| key)
    }

    /// The type OID the client should be told for its parameter `i` (0-based), if pgward
    /// changed it.
    pub fn client_type_oid(&self, i: usize) -> Option<u32> {
        match self.params.get(i) {
            Some((
                _,
                ParamUse::Encrypt(c) | ParamUse::BlindIndex(c) | ParamUse::PreviousBlindIndex(c),
            )) => Some(c.ty.oid()),
            _ => None,
        }
    }
}

/// Parameter bookkeeping across one text.
#[derive(Default)]
pub(super) struct Params {
    /// 0-based client parameter → how it is used (only encrypted uses are recorded).
    pub(super) uses: HashMap<usize, ParamUse>,
    /// Occurrences of each client parameter, and how many an encrypted context consumed.
    pub(super) seen: HashMap<usize, usize>,
    pub(super) consumed: HashMap<usize, usize>,
    /// Parameters pgward adds: (source client parameter, use), numbered after the client's.
    pub(super) added: Vec<(usize, ParamUse)>,
    pub(super) max_client: usize,
    pub(super) copy: Option<CopyPlan>,
    pub(super) row_keys: Vec<(usize, RowKey)>,
    pub(super) result_keys: usize,
}

impl Params {
    pub(super) fn claim(&mut self, index: usize, usage: ParamUse) -> Result<(), Refused> {
        match self.uses.get(&index) {
            Some(existing) if *existing != usage => {
                return Err(refuse(format!(
                "pgward: parameter ${} is used for two different encrypted purposes; bind it twice",
                index + 1
            )))
            }
            _ => {}
        }
        self.uses.insert(index, usage);
        *self.consumed.entry(index).or_default() += 1;
        Ok(())
    }

    /// Client parameter `index` (an encrypted value) is sealed bound to the row key `key`.
    pub(super) fn bind_row(&mut self, index: usize, key: RowKey) -> Result<(), Refused> {
        match self.row_keys.iter().find(|(i, _)| *i == index) {
            Some((_, existing)) if *existing != key => Err(refuse(format!(
                "pgward: parameter ${} is written to rows with different primary keys; bind it once per row",
                index + 1
            ))),
            Some(_) => Ok(()),
            None => {
                self.row_keys.push((index, key));
                Ok(())
            }
        }
    }

    /// A parameter pgward adds, carrying `usage` of client parameter `source`; its number.
    pub(super) fn add(&mut self, source: usize, usage: ParamUse) -> usize {
        self.added.push((source, usage));
        self.added.len() // offset after max_client, fixed up in `plan`
    }

    pub(super) fn plan(&self) -> Result<Option<Arc<ParamPlan>>, Refused> {
        for (index, n) in &self.seen {
            if self.uses.contains_key(index) && self.consumed.get(index) != Some(n) {
                return Err(refuse(format!(
                    "pgward: parameter ${} goes into an encrypted column and is also used elsewhere; bind it twice",
                    index + 1
                )));
            }
        }
        if self.uses.is_empty()
            && self.added.is_empty()
            && self.copy.is_none()
            && self.result_keys == 0
        {
            return Ok(None);
        }
        let mut params: Vec<(usize, ParamUse)> = (0..self.max_client)
            .map(|i| (i, self.uses.get(&i).cloned().unwrap_or(ParamUse::Plain)))
            .collect();
        params.extend(self.added.iter().cloned());
        Ok(Some(Arc::new(ParamPlan {
            client_count: self.max_client,
            params,
            copy: self.copy.clone(),
            row_keys: self.row_keys.clone(),
            result_keys: self.result_keys,
        })))
    }
}
