# bash completion for passtctl (installed by setup.sh as
# /usr/share/bash-completion/completions/passtctl).
#
# Instance names come from the sockets in /run/passtd (every instance has one, running or
# waiting for qemu under socket activation), forward ids from the instance itself
# (`passtctl NAME forwards --json`), libvirt domains from `virsh list --all --name`.

_passtctl_instances() {
	local sock
	for sock in /run/passtd/*.sock; do
		[ -e "$sock" ] || continue
		sock=${sock##*/}
		printf '%s\n' "${sock%.sock}"
	done
}

_passtctl_forward_ids() {
	passtctl "$1" forwards --json 2>/dev/null |
		python3 -c 'import json, sys; print("\n".join(str(f["id"]) for f in json.load(sys.stdin)))' \
			2>/dev/null
}

_passtctl() {
	local cur=${COMP_WORDS[COMP_CWORD]}
	local options="--system --session --bus-address --json -h --help"
	local words=() i
	# the words before the cursor that are not options (or an option's value)
	for ((i = 1; i < COMP_CWORD; i++)); do
		case ${COMP_WORDS[i]} in
		--bus-address) ((i++)) ;;
		-*) ;;
		*) words+=("${COMP_WORDS[i]}") ;;
		esac
	done
	if [ "${COMP_WORDS[COMP_CWORD - 1]}" = --bus-address ]; then
		return 0
	fi
	if [[ $cur == -* ]]; then
		mapfile -t COMPREPLY < <(compgen -W "$options --address --persist --forward --mtu --ipv4 --gateway4 --ipv6 --gateway6 --pin --dns --mac --connect" -- "$cur")
		return 0
	fi
	case ${#words[@]} in
	0)
		mapfile -t COMPREPLY < <(compgen -W "list metrics libvirt $(_passtctl_instances)" -- "$cur") ;;
	1)
		case ${words[0]} in
		list|metrics) ;;
		libvirt) mapfile -t COMPREPLY < <(compgen -W "attach detach" -- "$cur") ;;
		*) mapfile -t COMPREPLY < <(compgen -W "status forwards flows stats monitor forward" -- "$cur") ;;
		esac ;;
	2)
		case ${words[0]}:${words[1]} in
		libvirt:attach | libvirt:detach)
			mapfile -t COMPREPLY < <(compgen -W "$(virsh -q list --all --name 2>/dev/null)" -- "$cur") ;;
		*:forward) mapfile -t COMPREPLY < <(compgen -W "add remove" -- "$cur") ;;
		esac ;;
	3)
		case ${words[1]}:${words[2]} in
		forward:add) mapfile -t COMPREPLY < <(compgen -W "tcp udp" -- "$cur") ;;
		forward:remove)
			mapfile -t COMPREPLY < <(compgen -W "$(_passtctl_forward_ids "${words[0]}")" -- "$cur") ;;
		esac ;;
	esac
	return 0
}
complete -F _passtctl passtctl
