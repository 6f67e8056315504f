# Shared by scripts/test_matrix.sh and scripts/peer_suites.sh (sourced, not run).

# loud LINE...: a banner on stderr, for what must not scroll by unnoticed.
loud() {
    {
        echo
        echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
        printf '!! %s\n' "$@"
        echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
        echo
    } >&2
}

# check_choices WHO WHAT VAR ALLOWED...: exit 2, naming it, at the first word of
# $VAR (space separated) that is not one of ALLOWED.
check_choices() {
    local who="$1" what="$2" var="$3" value allowed ok
    shift 3
    for value in ${!var}; do
        ok=
        for allowed in "$@"; do
            [ "$value" = "$allowed" ] && ok=1
        done
        if [ -z "$ok" ]; then
            local expected
            expected="$(printf '%s, ' "$@")"
            echo "$who: unknown $what '$value' in $var (expected ${expected%, })" >&2
            exit 2
        fi
    done
}
