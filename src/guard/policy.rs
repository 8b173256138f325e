//! The route policy as a pure function of the verdict available when the wait budget ends
//! (DESIGN §3.6).

use crate::config::{FailMode, PolicyConfig, PolicyMode};

use super::verdict::Verdict;

/// What to do with the upstream's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Pass it on; when `annotate`, add headers (and body) showing `shown`.
    Pass {
        /// Verdict shown to the client.
        shown: Verdict,
        /// Add `diffguard-*` headers.
        annotate: bool,
    },
    /// 422 with the verdict.
    Reject,
    /// 503: reject mode, fail closed, no verdict in time.
    Unavailable,
}

/// Applies `policy` to the combined verdict `now`.
pub fn decide(policy: &PolicyConfig, now: Verdict) -> Decision {
    match policy.mode {
        PolicyMode::Off | PolicyMode::Shadow => Decision::Pass {
            shown: now,
            annotate: false,
        },
        PolicyMode::Flag => Decision::Pass {
            shown: now,
            annotate: true,
        },
        PolicyMode::Reject => match (now, policy.fail_mode) {
            (Verdict::Ood, _) => Decision::Reject,
            (Verdict::InDistribution, _) => Decision::Pass {
                shown: now,
                annotate: true,
            },
            (Verdict::Pending | Verdict::Unverified, FailMode::Open) => Decision::Pass {
                shown: Verdict::Unverified,
                annotate: true,
            },
            (Verdict::Pending | Verdict::Unverified, FailMode::Closed) => Decision::Unavailable,
        },
    }
}

/// Whether the mode waits for a verdict at all.
pub fn waits(mode: PolicyMode) -> bool {
    matches!(mode, PolicyMode::Reject | PolicyMode::Flag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::*;

    fn p(mode: PolicyMode, fail_mode: FailMode) -> PolicyConfig {
        PolicyConfig {
            mode,
            wait_ms: 10,
            fail_mode,
        }
    }

    #[test]
    fn reject_table() {
        for fm in [FailMode::Open, FailMode::Closed] {
            assert_eq!(decide(&p(PolicyMode::Reject, fm), Ood), Decision::Reject);
            assert_eq!(
                decide(&p(PolicyMode::Reject, fm), InDistribution),
                Decision::Pass {
                    shown: InDistribution,
                    annotate: true
                }
            );
        }
        for v in [Pending, Unverified] {
            assert_eq!(
                decide(&p(PolicyMode::Reject, FailMode::Open), v),
                Decision::Pass {
                    shown: Unverified,
                    annotate: true
                }
            );
            assert_eq!(
                decide(&p(PolicyMode::Reject, FailMode::Closed), v),
                Decision::Unavailable
            );
        }
    }

    #[test]
    fn flag_shadow_off_never_block() {
        for v in [Ood, InDistribution, Pending, Unverified] {
            for fm in [FailMode::Open, FailMode::Closed] {
                assert_eq!(
                    decide(&p(PolicyMode::Flag, fm), v),
                    Decision::Pass {
                        shown: v,
                        annotate: true
                    }
                );
                assert_eq!(
                    decide(&p(PolicyMode::Shadow, fm), v),
                    Decision::Pass {
                        shown: v,
                        annotate: false
                    }
                );
                assert_eq!(
                    decide(&p(PolicyMode::Off, fm), v),
                    Decision::Pass {
                        shown: v,
                        annotate: false
                    }
                );
            }
        }
    }
}
