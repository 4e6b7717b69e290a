//! The built-in verifiable rewards: last-number extraction, numeric answers with tolerance, exact
//! match, regex format, and errors that name the record field.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rtrain_core::config::RewardSpec;
use rtrain_rl::reward::{ExactMatch, NumericAnswer, RegexFormat, RewardError, last_number};
use rtrain_rl::{RewardFn, RewardInput, Scored, build_reward};
use serde_json::{Map, Value, json};
use tch::Device;

fn record(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// Scores `responses` against one record each.
fn score(reward: &mut dyn RewardFn, cases: &[(&str, &Map<String, Value>)]) -> Result<Vec<Scored>, RewardError> {
    let inputs: Vec<RewardInput<'_>> =
        cases.iter().map(|(response, record)| RewardInput { prompt: "Q", response, record, ended: true }).collect();
    reward.score(&inputs)
}

#[test]
fn last_number_is_the_final_answer() {
    let cases: &[(&str, Option<f64>)] = &[
        ("The answer is -12.5.", Some(-12.5)),
        ("3 + 4 = 7", Some(7.0)),
        ("We have 1,234,567 apples", Some(1_234_567.0)),
        ("first 1,000 then 2,500.75!", Some(2500.75)),
        // A comma before a space or a non-group separates numbers.
        ("3, 4", Some(4.0)),
        ("pages 3-5", Some(5.0)),
        ("x = -5", Some(-5.0)),
        ("so +8", Some(8.0)),
        ("2e3 grams", Some(2000.0)),
        ("about .5", Some(0.5)),
        ("12.", Some(12.0)),
        ("5eggs", Some(5.0)),
        // Unicode around the number, and the Unicode minus sign.
        ("答案是 42。", Some(42.0)),
        ("Ответ: \u{2212}7", Some(-7.0)),
        // A decimal comma is not read as one.
        ("température: 21,5 °C", Some(5.0)),
        ("no number here", None),
        ("", None),
        // Non-ASCII digits are not read as numbers.
        ("４２", None),
    ];
    for (text, want) in cases {
        assert_eq!(last_number(text), *want, "{text:?}");
    }
}

#[test]
fn numeric_answer_within_tolerance() {
    let mut reward = NumericAnswer::new("answer", 1e-6);
    let int = record(json!({"answer": 42}));
    let float = record(json!({"answer": -12.5}));
    let text = record(json!({"answer": " 1,234 "}));
    let got = score(
        &mut reward,
        &[
            ("The answer is 42.", &int),
            ("42.0000001", &int),
            ("42.001", &int),
            ("41 or 42? I say 41", &int),
            ("The answer is -12.5.", &float),
            ("It is 1234", &text),
            ("no idea", &int),
            ("1e999", &int),
        ],
    )
    .unwrap();
    let correct: Vec<Option<bool>> = got.iter().map(|s| s.correct).collect();
    let t = Some(true);
    let f = Some(false);
    assert_eq!(correct, [t, t, f, f, t, t, f, f]);
    let rewards: Vec<f64> = got.iter().map(|s| s.reward).collect();
    assert_eq!(rewards, [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);

    let mut loose = NumericAnswer::new("answer", 0.01);
    assert_eq!(score(&mut loose, &[("42.005", &int)]).unwrap()[0].correct, Some(true));
}

#[test]
fn records_without_a_usable_answer_are_errors_naming_the_field() {
    let mut reward = NumericAnswer::new("target", 0.0);
    let ok = record(json!({"target": "7"}));
    let missing = record(json!({"answer": 7}));
    let e = score(&mut reward, &[("7", &ok), ("7", &missing)]).unwrap_err();
    assert!(matches!(&e, RewardError::Record { index: 1, field, .. } if field == "target"), "{e}");
    assert!(e.to_string().contains("input 1: record field `target` is missing"), "{e}");
    for bad in [json!({"target": "seven"}), json!({"target": null}), json!({"target": [7]}), json!({"target": "nan"})] {
        let r = record(bad.clone());
        let e = score(&mut reward, &[("7", &r)]).unwrap_err().to_string();
        assert!(e.contains("`target`") && e.contains("not a finite number"), "{bad}: {e}");
    }
    let mut exact = ExactMatch::new("answer");
    let e = score(&mut exact, &[("x", &record(json!({"answer": {"a": 1}})))]).unwrap_err().to_string();
    assert!(e.contains("`answer`") && e.contains("not an answer"), "{e}");
}

#[test]
fn exact_match_compares_trimmed_text() {
    let mut reward = ExactMatch::new("answer");
    let paris = record(json!({"answer": "Paris"}));
    let number = record(json!({"answer": 12}));
    let yes = record(json!({"answer": true}));
    let got = score(
        &mut reward,
        &[
            ("  Paris\n", &paris),
            ("paris", &paris),
            ("Paris.", &paris),
            ("12", &number),
            ("12.0", &number),
            ("true", &yes),
        ],
    )
    .unwrap();
    let correct: Vec<bool> = got.iter().map(|s| s.correct.unwrap()).collect();
    assert_eq!(correct, [true, false, false, true, false, true]);
}

#[test]
fn regex_format_is_a_reward_without_a_verdict() {
    let mut reward = RegexFormat::new(r"(?s)^<think>.+</think>\s*\S+$").unwrap();
    let r = record(json!({}));
    let got = score(&mut reward, &[("<think>a\nb</think> 4", &r), ("4", &r), ("<think></think> 4", &r)]).unwrap();
    assert_eq!(
        got,
        [
            Scored { reward: 1.0, correct: None },
            Scored { reward: 0.0, correct: None },
            Scored { reward: 0.0, correct: None }
        ]
    );
    let e = RegexFormat::new("(unclosed").unwrap_err();
    assert!(matches!(&e, RewardError::Pattern { pattern, .. } if pattern == "(unclosed"), "{e}");
}

#[test]
fn rewards_are_built_from_their_spec() {
    let r = record(json!({"answer": "5", "label": "yes"}));
    let mut numeric =
        build_reward(&RewardSpec::Numeric { field: "answer".into(), tolerance: 0.0 }, Device::Cpu).unwrap();
    assert_eq!(score(numeric.as_mut(), &[("= 5", &r)]).unwrap()[0].correct, Some(true));
    let mut exact = build_reward(&RewardSpec::Exact { field: "label".into() }, Device::Cpu).unwrap();
    assert_eq!(score(exact.as_mut(), &[("yes", &r), ("no", &r)]).unwrap()[1].correct, Some(false));
    let mut regex = build_reward(&RewardSpec::Regex { pattern: "^=".into() }, Device::Cpu).unwrap();
    assert_eq!(score(regex.as_mut(), &[("= 5", &r)]).unwrap()[0].reward, 1.0);
    assert!(score(regex.as_mut(), &[]).unwrap().is_empty());
    let e = build_reward(&RewardSpec::Regex { pattern: "[".into() }, Device::Cpu).err().unwrap();
    assert!(matches!(e, RewardError::Pattern { .. }));
}
