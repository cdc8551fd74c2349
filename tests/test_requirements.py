import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from deployments.requirements import RequirementsError, parse_requirements


def test_it_accepts_names_pins_extras_and_comments():
    parsed = parse_requirements(
        "# trained on 2026-11-01\nscikit-learn==1.5.2\n\nnumpy  # any\nPandas[Performance]==2.2.3   # frames\n"
    )
    assert [str(r) for r in parsed.items] == ["numpy", "pandas[performance]==2.2.3", "scikit-learn==1.5.2"]


def test_equal_requirements_normalise_to_the_same_text():
    a = parse_requirements("Scikit_Learn==1.5.2\nnumpy==2.1.0\n")
    b = parse_requirements("numpy == 2.1.0\nscikit-learn==1.5.2  # pinned\n")
    assert a.normalised() == b.normalised()


@pytest.mark.parametrize(
    "line, message",
    [
        ("-e git+https://example.com/x.git#egg=x", "`-e` is not allowed"),
        ("--index-url https://evil.example/simple", "`--index-url` is not allowed"),
        ("--extra-index-url=https://evil.example/simple", "`--extra-index-url` is not allowed"),
        ("-i https://evil.example/simple", "`-i` is not allowed"),
        ("--find-links /tmp/wheels", "`--find-links` is not allowed"),
        ("--trusted-host evil.example", "`--trusted-host` is not allowed"),
        ("-r other.txt", "`-r` is not allowed"),
        ("-c constraints.txt", "`-c` is not allowed"),
        ("https://evil.example/pkg-1.0.tar.gz", "URLs are not allowed"),
        ("git+https://github.com/x/y.git", "URLs are not allowed"),
        ("pkg @ https://evil.example/pkg.whl", "direct references"),
        ("./local/package", "paths are not allowed"),
        ("/abs/path/pkg.whl", "paths are not allowed"),
        ("numpy==1.26.4; python_version<'3.12'", "environment markers"),
        ("numpy>=1.26", "only exact pins are allowed"),
        ("numpy~=1.26", "only exact pins are allowed"),
        ("numpy==not-a-version", "not a valid version"),
    ],
)
def test_it_refuses_anything_but_names_and_pins_with_a_reason(line, message):
    with pytest.raises(RequirementsError) as refused:
        parse_requirements(f"scikit-learn==1.5.2\n{line}\n")
    assert "line 2" in str(refused.value)
    assert message in str(refused.value)


def test_it_refuses_a_file_with_no_packages():
    with pytest.raises(RequirementsError, match="lists no packages"):
        parse_requirements("# nothing\n\n")


def test_it_refuses_a_package_listed_twice():
    with pytest.raises(RequirementsError, match="listed twice"):
        parse_requirements("numpy==2.0.0\nNumPy==2.1.0\n")


def test_the_operator_allowlist_of_package_names_is_enforced():
    parse_requirements("scikit-learn==1.5.2\n", allowed_packages=["scikit-learn", "numpy"])
    with pytest.raises(RequirementsError, match="not on this ServeML's list of reviewed packages"):
        parse_requirements("scikit-learn==1.5.2\nevil-pkg==1.0\n", allowed_packages=["scikit-learn"])


PIP_SPECIALS = st.sampled_from(["-", "--", "/", "./", "~/", "http://", "https://", "file:", "git+", "@", ";", "\\"])


@hsettings(max_examples=300, deadline=None)
@given(prefix=st.text(max_size=5), special=PIP_SPECIALS, suffix=st.text(max_size=20))
def test_it_never_accepts_a_line_pip_would_read_as_an_option_url_or_path(prefix, special, suffix):
    line = f"{prefix}{special}{suffix}".replace("\n", " ").replace("\r", " ")
    code = line.split("#", 1)[0].strip()
    if not code or code.startswith("#"):
        return  # a comment or blank: pip ignores it too
    looks_dangerous = code.startswith("-") or any(s in code for s in ("://", "/", "\\", "@", ";", "file:"))
    if not looks_dangerous:
        return
    with pytest.raises(RequirementsError):
        parse_requirements(f"{line}\nscikit-learn==1.5.2\n")


@hsettings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=60))
def test_whatever_it_accepts_is_only_names_extras_and_exact_pins(text):
    try:
        parsed = parse_requirements(text)
    except RequirementsError:
        return
    for item in parsed.items:
        rendered = str(item)
        assert all(c.isalnum() or c in "-._[],=+!" for c in rendered), rendered
        assert not rendered.startswith("-")
