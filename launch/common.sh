# Shell helpers shared by the launch scripts (sourced, not run).

# Print a command so that it can be pasted back into a shell (quotes only where needed).
print_cmd() {
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
  done
  echo "${out[*]}"
}
