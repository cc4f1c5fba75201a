//! Estimating the m/u probabilities of the matching model from unlabelled records with
//! expectation–maximisation (`chorus identity train FILE`), as Fellegi–Sunter models
//! are usually fitted (Winkler 1988; Splink, recordlinkage's ECM).
//!
//! As Splink does, `u` (how often two *different* people agree by chance) is measured
//! directly on random record pairs, which are almost all non-matches; `m` and the match
//! share `p` are then fitted by EM on the candidate pairs (pairs sharing a blocking
//! key). Each pair is a vector of comparison levels; a pair is a match with probability
//! `p`, fields independent given match status. EM alternates the posterior match
//! probability of every distinct vector (E) and the m and p that maximise the expected
//! likelihood (M). Fixing u from random pairs keeps EM from settling on a "class" that
//! is not the match class.

use super::config::{FieldConfig, ProbabilisticConfig};
use super::matching::{blocking_keys, extract_fields, level};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// The fitted model and how it was fitted.
#[derive(Debug, Clone)]
pub struct Trained {
    pub fields: BTreeMap<String, FieldConfig>,
    /// Estimated share of candidate pairs that are matches.
    pub match_share: f64,
    pub records: usize,
    pub pairs: usize,
    pub iterations: usize,
}

/// Most records compared within one blocking key (larger blocks are common values
/// such as a frequent surname; sampling their first records keeps training quadratic
/// only in this bound).
const MAX_BLOCK: usize = 200;
/// Probabilities never reach 0 or 1 (a log weight of ±infinity).
const FLOOR: f64 = 1e-6;

/// Comparison levels of one pair: `None` where either record lacks the field.
type Pattern = Vec<Option<u8>>;

/// Fit m and u for every field of `model` to `records` (events, or bare trait objects).
pub fn train(model: &ProbabilisticConfig, records: &[Value], max_iterations: usize) -> Result<Trained, String> {
    let names: Vec<&String> = model.fields.keys().collect();
    let fields: Vec<BTreeMap<String, String>> = records
        .iter()
        .map(|r| {
            let event = if r.get("traits").is_some() { r.clone() } else { serde_json::json!({ "traits": r }) };
            extract_fields(model, &event)
        })
        .collect();
    let u = random_pair_u(model, &names, &fields);

    // One EM session per blocking rule, as Splink does: within a rule's pairs, the
    // fields the rule forces to agree say nothing and are left out; each other field's
    // m is estimated there. A field's m is the mean over the sessions that estimated it.
    let mut estimates: Vec<Vec<Vec<f64>>> = vec![Vec::new(); names.len()];
    let (mut total_pairs, mut shares, mut iterations) = (0, Vec::new(), 0);
    for rule in &model.blocking {
        let mut blocks: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, f) in fields.iter().enumerate() {
            for (r, key) in blocking_keys(model, f) {
                if r == rule.name {
                    let block = blocks.entry(key).or_default();
                    if block.len() < MAX_BLOCK {
                        block.push(i);
                    }
                }
            }
        }
        let forced: BTreeSet<&str> = rule.fields.iter().filter(|f| !f.contains('|')).map(String::as_str).collect();
        let mut patterns: BTreeMap<Pattern, f64> = BTreeMap::new();
        let mut pairs = 0;
        for members in blocks.values() {
            for (a, &i) in members.iter().enumerate() {
                for &j in &members[a + 1..] {
                    pairs += 1;
                    let pattern: Pattern = names
                        .iter()
                        .map(|name| match (fields[i].get(*name), fields[j].get(*name)) {
                            (Some(x), Some(y)) if !forced.contains(name.as_str()) => {
                                Some(level(&model.fields[*name], x, y) as u8)
                            }
                            _ => None,
                        })
                        .collect();
                    *patterns.entry(pattern).or_default() += 1.0;
                }
            }
        }
        if pairs < 10 {
            continue;
        }
        total_pairs += pairs;
        let start: Vec<Vec<f64>> = names.iter().map(|n| model.fields[*n].m.clone()).collect();
        let session = em(&patterns, start, &u, max_iterations);
        iterations = iterations.max(session.iterations);
        shares.push(session.p);
        for (f, observed) in session.observed.iter().enumerate() {
            if *observed {
                estimates[f].push(session.m[f].clone());
            }
        }
    }
    if total_pairs < 10 {
        return Err(format!(
            "only {total_pairs} candidate pairs share a blocking key among {} records: too few to estimate from",
            records.len()
        ));
    }
    let round = |x: f64| (x * 1e6).round().max(1.0) / 1e6;
    let fitted = names
        .iter()
        .enumerate()
        .map(|(f, name)| {
            let mut field = model.fields[*name].clone();
            if !estimates[f].is_empty() {
                let n = estimates[f].len() as f64;
                field.m =
                    (0..field.m.len()).map(|l| round(estimates[f].iter().map(|e| e[l]).sum::<f64>() / n)).collect();
            }
            field.u = u[f].iter().map(|x| round(*x)).collect();
            ((*name).clone(), field)
        })
        .collect();
    let match_share = shares.iter().sum::<f64>() / shares.len().max(1) as f64;
    Ok(Trained { fields: fitted, match_share, records: records.len(), pairs: total_pairs, iterations })
}

struct Session {
    m: Vec<Vec<f64>>,
    p: f64,
    /// Fields compared in at least one pair of the session.
    observed: Vec<bool>,
    iterations: usize,
}

/// EM for m and p with u fixed.
fn em(patterns: &BTreeMap<Pattern, f64>, mut m: Vec<Vec<f64>>, u: &[Vec<f64>], max_iterations: usize) -> Session {
    let mut observed = vec![false; m.len()];
    for pattern in patterns.keys() {
        for (f, l) in pattern.iter().enumerate() {
            observed[f] |= l.is_some();
        }
    }
    let mut p: f64 = 0.1;
    let mut iterations = 0;
    for _ in 0..max_iterations {
        iterations += 1;
        let mut m_acc: Vec<Vec<f64>> = m.iter().map(|l| vec![0.0; l.len()]).collect();
        let (mut matched, mut total) = (0.0, 0.0);
        for (pattern, count) in patterns {
            // Log space: many fields make the products tiny.
            let (mut lm, mut lu) = (p.ln(), (1.0 - p).ln());
            for (f, l) in pattern.iter().enumerate() {
                if let Some(l) = l {
                    lm += m[f][*l as usize].ln();
                    lu += u[f][*l as usize].ln();
                }
            }
            let g = 1.0 / (1.0 + (lu - lm).exp());
            matched += g * count;
            total += count;
            for (f, l) in pattern.iter().enumerate() {
                if let Some(l) = l {
                    m_acc[f][*l as usize] += g * count;
                }
            }
        }
        let new_p = (matched / total).clamp(FLOOR, 1.0 - FLOOR);
        let mut change = (new_p - p).abs();
        for (probs, acc) in m.iter_mut().zip(&m_acc) {
            let sum: f64 = acc.iter().sum();
            if sum <= 0.0 {
                continue;
            }
            for (prob, a) in probs.iter_mut().zip(acc) {
                let next = (a / sum).clamp(FLOOR, 1.0);
                change = change.max((next - *prob).abs());
                *prob = next;
            }
        }
        p = new_p;
        if change < 1e-6 {
            break;
        }
    }
    Session { m, p, observed, iterations }
}

/// Random record pairs sampled, at most.
const U_SAMPLE: usize = 200_000;

/// u per field and level, from random pairs of records (seeded: the same file gives
/// the same model). Levels never seen keep a floor.
fn random_pair_u(model: &ProbabilisticConfig, names: &[&String], fields: &[BTreeMap<String, String>]) -> Vec<Vec<f64>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed);
    let mut counts: Vec<Vec<f64>> = names.iter().map(|n| vec![0.0; model.fields[*n].levels()]).collect();
    let n = fields.len();
    let samples = U_SAMPLE.min(n.saturating_mul(n.saturating_sub(1)) / 2);
    for _ in 0..samples {
        let (i, j) = (rng.random_range(0..n), rng.random_range(0..n));
        if i == j {
            continue;
        }
        for (f, name) in names.iter().enumerate() {
            if let (Some(a), Some(b)) = (fields[i].get(*name), fields[j].get(*name)) {
                counts[f][level(&model.fields[*name], a, b)] += 1.0;
            }
        }
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(f, c)| {
            let total: f64 = c.iter().sum();
            if total == 0.0 {
                return model.fields[names[f]].u.clone();
            }
            c.iter().map(|x| (x / total).max(FLOOR)).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    /// Synthetic people and noisy duplicates: EM must find that agreement on a name is
    /// far likelier among matches than among non-matches.
    #[test]
    fn em_separates_matches_from_non_matches() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let syllables = ["an", "bo", "ca", "dev", "el", "fin", "gus", "ha", "iv", "jo", "ka", "lu", "mo", "ne", "or"];
        let mut name =
            |parts: usize| -> String { (0..parts).map(|_| syllables[rng.random_range(0..syllables.len())]).collect() };
        let people: Vec<(String, String)> = (0..400).map(|_| (name(2), name(3))).collect();
        let mut records = Vec::new();
        for (i, (f, l)) in people.iter().enumerate() {
            let dob = format!(
                "19{:02}-{:02}-{:02}",
                rng.random_range(40..99),
                rng.random_range(1..13),
                rng.random_range(1..29)
            );
            let pc = format!("{}", 2000 + i % 7);
            records.push(json!({"firstName": f, "lastName": l, "birthday": dob, "address": {"postalCode": pc}}));
            if i % 2 == 0 {
                let typo = if rng.random_bool(0.3) { format!("{f}e") } else { f.clone() };
                records.push(json!({"firstName": typo, "lastName": l, "birthday": dob, "address": {"postalCode": pc}}));
            }
        }
        let model = ProbabilisticConfig::default();
        let trained = train(&model, &records, 1000).unwrap();
        let fname = &trained.fields["first_name"];
        assert!(fname.m[0] > 0.5, "{fname:?}");
        assert!(fname.m[0] / fname.u[0] > 5.0, "{fname:?}");
        let dob = &trained.fields["birthday"];
        assert!(dob.m[0] > 0.8 && dob.u[0] < 0.01, "{dob:?}");
        assert!(trained.match_share > 0.0 && trained.match_share < 1.0);
    }

    #[test]
    fn too_few_pairs_is_an_error() {
        let records = vec![json!({"firstName": "ann"}), json!({"firstName": "bob"})];
        assert!(train(&ProbabilisticConfig::default(), &records, 10).unwrap_err().contains("too few"));
    }
}
