%% @doc Bytes <-> frames <-> terms for PROTOCOL.md v1, shared by the server
%% (sshrpc_server) and the client (sshrpc_client). No processes, no I/O.
%%
%% A frame is a 4-byte big-endian length and one External Term Format
%% payload. `take/2' cuts complete frames off a buffer and checks each length
%% against the receiver's max_frame before the payload is buffered.
%% `decode/2' turns a payload into a term with binary_to_term(B, [safe]) and,
%% when that fails, walks the payload to say what is wrong and at which byte
%% offset (PROTOCOL.md section 2).
-module(sshrpc_wire).

-export([frame/1, frame/2, encode/1, take/2, take_one/2, decode/2, decode_new_atoms/1,
         check/1, envelope/1]).
-export([buffer/0, buffer/1, buffer_add/2]).

-define(MAX_DEPTH, 10000).

-opaque buffer() :: {binary(), [binary()], non_neg_integer(), pos_integer()}.
-export_type([buffer/0]).

-type decode_opts() :: #{max := pos_integer(), new_atoms => non_neg_integer()}.
-export_type([decode_opts/0]).

%% @doc The ETF payload of Term as OTP 26+ encodes it by default (UTF-8 atoms,
%% tag 70 floats).
-spec encode(term()) -> binary().
encode(Term) ->
    term_to_binary(Term, [{minor_version, 2}]).

%% @doc A whole frame (length prefix and payload) for Term.
-spec frame(term()) -> iodata().
frame(Term) ->
    B = encode(Term),
    [<<(byte_size(B)):32>>, B].

%% @doc Like frame/1, but refuses a payload larger than Max bytes.
-spec frame(term(), pos_integer()) -> {ok, iodata(), non_neg_integer()} | {too_large, non_neg_integer()}.
frame(Term, Max) ->
    B = encode(Term),
    case byte_size(B) of
        N when N > Max -> {too_large, N};
        N -> {ok, [<<N:32>>, B], N + 4}
    end.

%% @doc Cut the complete frames off Buf. Keepalives (length 0) are dropped.
%% Returns the payloads in order and the rest of the buffer, or the first
%% length that exceeds Max (the payload is never buffered then).
-spec take(binary(), pos_integer()) ->
    {[binary()], binary()} | {too_large, [binary()], non_neg_integer()}.
take(Buf, Max) ->
    take(Buf, Max, []).

%% A receive buffer: the bytes of an incomplete frame, kept as a list of
%% chunks until the frame is complete, and joined once. (Appending each SSH
%% packet to one binary that is also matched copies it every time: quadratic
%% for a 16 MiB frame.)

-spec buffer() -> buffer().
buffer() ->
    {<<>>, [], 0, 4}.

%% @doc A buffer holding Rest, the bytes left after take_one/2.
-spec buffer(binary()) -> buffer().
buffer(<<Len:32, _/binary>> = Rest) ->
    {Rest, [], byte_size(Rest), 4 + Len};
buffer(Rest) ->
    {Rest, [], byte_size(Rest), 4}.

%% @doc Add received bytes. {ready, Bin} when Bin may hold a whole frame (or
%% at least its length); then cut frames with take_one/2 and make a new
%% buffer from the rest with buffer/1.
-spec buffer_add(binary(), buffer()) -> {ready, binary()} | {wait, buffer()}.
buffer_add(Data, {Bin, Rev, Size, Need}) ->
    case Size + byte_size(Data) of
        S when S < Need -> {wait, {Bin, [Data | Rev], S, Need}};
        _ -> {ready, iolist_to_binary([Bin | lists:reverse([Data | Rev])])}
    end.

%% @doc Cut one complete frame off Buf (keepalives are skipped).
-spec take_one(binary(), pos_integer()) ->
    {frame, binary(), binary()} | {more, binary()} | {too_large, non_neg_integer()}.
take_one(<<0:32, Rest/binary>>, Max) ->
    take_one(Rest, Max);
take_one(<<Len:32, _/binary>>, Max) when Len > Max ->
    {too_large, Len};
take_one(<<Len:32, Payload:Len/binary, Rest/binary>>, _Max) ->
    {frame, Payload, Rest};
take_one(Rest, _Max) ->
    {more, Rest}.

take(<<0:32, Rest/binary>>, Max, Acc) ->
    take(Rest, Max, Acc);
take(<<Len:32, _/binary>>, Max, Acc) when Len > Max ->
    {too_large, lists:reverse(Acc), Len};
take(<<Len:32, Payload:Len/binary, Rest/binary>>, Max, Acc) ->
    take(Rest, Max, [Payload | Acc]);
take(Rest, _Max, Acc) ->
    {lists:reverse(Acc), Rest}.

%% @doc Decode one payload.
%%
%% A payload that binary_to_term(B, [safe]) accepts decodes at once. One
%% whose only fault is atoms this node does not know yet (or external funs,
%% `fun M:F/A', whose export entries are not collected either) is walked
%% first, without creating anything, and the distinct unknown atoms counted:
%% - with #{new_atoms => Budget}, up to Budget of them are accepted and the
%%   payload decoded ({ok, Term, Count}); the client uses this for the atoms
%%   in a server's answers;
%% - otherwise (or beyond Budget) the answer is {new_atoms, Count, Detail}:
%%   nothing was created; the caller charges Count to its budgets and calls
%%   decode_new_atoms/1 if they allow it (the server does this).
-spec decode(binary(), decode_opts()) ->
    {ok, term(), non_neg_integer()} | {error, binary()} | {inflate_too_large, non_neg_integer()}
    | {new_atoms, pos_integer(), binary()}.
decode(<<131, 80, Size:32, _/binary>>, #{max := Max}) when Size > Max ->
    {inflate_too_large, Size};
decode(Payload, Opts) ->
    try binary_to_term(Payload, [safe, used]) of
        {Term, Used} when Used =:= byte_size(Payload) -> {ok, Term, 0};
        {_, Used} -> {error, detail(<<"trailing bytes after the term">>, Used)}
    catch
        error:badarg -> decode_unsafe(Payload, Opts)
    end.

decode_unsafe(<<131, 80, Size:32, Z/binary>> = Payload, Opts) ->
    %% Compressed (Size is at most max, checked above): inflate at most Size
    %% bytes and look at the term inside.
    case inflate(Z, Size) of
        {ok, Raw} ->
            case decode_unsafe(<<131, Raw/binary>>, Opts#{new_atoms => 0}) of
                {new_atoms, N, Detail} ->
                    case N =< maps:get(new_atoms, Opts, 0) of
                        true ->
                            case decode_new_atoms(Payload) of
                                {ok, Term} -> {ok, Term, N};
                                Error -> Error
                            end;
                        false ->
                            {new_atoms, N, Detail}
                    end;
                Other ->
                    Other
            end;
        error ->
            {error, detail(<<"invalid compressed term">>, 0)}
    end;
decode_unsafe(Payload, Opts) ->
    Budget = maps:get(new_atoms, Opts, 0),
    case check(Payload) of
        {ok, NewAtoms, _} when NewAtoms > 0, NewAtoms =< Budget ->
            case decode_new_atoms(Payload) of
                {ok, Term} -> {ok, Term, NewAtoms};
                Error -> Error
            end;
        {ok, NewAtoms, {Offset, Text}} when NewAtoms > 0 ->
            {new_atoms, NewAtoms, detail(iolist_to_binary(io_lib:format(
                "~b atoms unknown to this node, the first '~ts'", [NewAtoms, Text])), Offset)};
        {ok, NewAtoms, none} when NewAtoms > 0 ->
            {new_atoms, NewAtoms, detail(iolist_to_binary(io_lib:format(
                "~b external funs", [NewAtoms])), 0)};
        {ok, 0, _} ->
            {error, detail(<<"term refused by binary_to_term(B, [safe])">>, 0)};
        {error, What, Offset} ->
            {error, detail(What, Offset)}
    end.

%% zlib data that inflates to exactly Size bytes, never inflating more.
inflate(Z, Size) ->
    S = zlib:open(),
    try
        ok = zlib:inflateInit(S),
        inflate_loop(S, zlib:safeInflate(S, Z), Size, [], 0)
    catch
        _:_ -> error
    after
        zlib:close(S)
    end.

inflate_loop(S, {continue, Out}, Size, Acc, N) ->
    case N + iolist_size(Out) of
        N1 when N1 > Size -> error;
        N1 -> inflate_loop(S, zlib:safeInflate(S, []), Size, [Out | Acc], N1)
    end;
inflate_loop(_S, {finished, Out}, Size, Acc, N) ->
    case N + iolist_size(Out) of
        Size -> {ok, iolist_to_binary(lists:reverse([Out | Acc]))};
        _ -> error
    end;
inflate_loop(_S, _, _Size, _Acc, _N) ->
    error.

%% @doc Decode a payload for which decode/2 answered {new_atoms, N, _}, once
%% the caller has accepted N new atoms: this creates them.
-spec decode_new_atoms(binary()) -> {ok, term()} | {error, binary()}.
decode_new_atoms(Payload) ->
    try binary_to_term(Payload, [used]) of
        {Term, Used} when Used =:= byte_size(Payload) -> {ok, Term};
        {_, Used} -> {error, detail(<<"trailing bytes after the term">>, Used)}
    catch
        error:badarg -> {error, detail(<<"invalid term">>, 0)}
    end.

%% @doc The start of a request, read without decoding it (for a payload that
%% cannot be decoded now): its tag, if it is an atom this node knows, the
%% second element if it is an integer (the id of call, spawn, cancel and
%% credit), and the bytes after the tag. `unknown' where a part cannot be read.
-spec envelope(binary()) ->
    {atom(), pos_integer(), integer() | unknown, binary()} | unknown.
envelope(<<131, 104, Arity, Rest/binary>>) when Arity >= 1 ->
    envelope_tag(Arity, Rest);
envelope(<<131, 105, Arity:32, Rest/binary>>) when Arity >= 1 ->
    envelope_tag(Arity, Rest);
envelope(_) ->
    unknown.

envelope_tag(Arity, Bin) ->
    Parsed = case Bin of
                 <<118, L:16, T:L/binary, R/binary>> -> {T, utf8, R};
                 <<119, L, T:L/binary, R/binary>> -> {T, utf8, R};
                 <<100, L:16, T:L/binary, R/binary>> -> {T, latin1, R};
                 <<115, L, T:L/binary, R/binary>> -> {T, latin1, R};
                 _ -> unknown
             end,
    case Parsed of
        unknown -> unknown;
        {Text, Enc, Rest} ->
            try binary_to_existing_atom(Text, Enc) of
                Tag when Arity >= 2 -> {Tag, Arity, envelope_int(Rest), Rest};
                Tag -> {Tag, Arity, unknown, Rest}
            catch
                error:badarg -> unknown
            end
    end.

envelope_int(<<97, I, _/binary>>) -> I;
envelope_int(<<98, I:32/signed, _/binary>>) -> I;
envelope_int(<<110, N, Sign, Digits:N/binary, _/binary>>) ->
    I = binary:decode_unsigned(Digits, little),
    case Sign of 0 -> I; _ -> -I end;
envelope_int(_) -> unknown.

detail(What, Offset) ->
    iolist_to_binary([What, io_lib:format(" at byte ~b", [Offset])]).

%% @doc Walk an ETF payload without building it. Returns how many distinct
%% atoms in it are unknown to this node (plus one per external fun,
%% `fun M:F/A', whose export entry is never collected either), or what is
%% wrong and where. Unknown atoms are not an error here: decode/2 decides.
-spec check(binary()) ->
    {ok, non_neg_integer(), none | {non_neg_integer(), binary()}}
    | {error, binary(), non_neg_integer()}.
check(<<131, 80, _:32, _/binary>>) ->
    %% Compressed: binary_to_term already rejected it; report it as a whole.
    {error, <<"invalid compressed term">>, 0};
check(<<131, Rest/binary>> = Payload) ->
    erase(sshrpc_first_unknown_atom),
    put(sshrpc_unknown_atoms, #{}),
    try walk(Rest, 1, 0, 0) of
        {<<>>, _Off, New} ->
            erase(sshrpc_unknown_atoms),
            case erase(sshrpc_first_unknown_atom) of
                undefined -> {ok, New, none};
                First -> {ok, New, First}
            end;
        {_, Off, _} -> erase(sshrpc_unknown_atoms), {error, <<"trailing bytes after the term">>, Off}
    catch
        throw:{bad, What, Off} -> erase(sshrpc_unknown_atoms), {error, What, Off};
        error:_ -> erase(sshrpc_unknown_atoms), {error, <<"truncated term">>, byte_size(Payload)}
    end;
check(<<>>) ->
    {error, <<"empty payload">>, 0};
check(_) ->
    {error, <<"payload does not start with version byte 131">>, 0}.

bad(What, Off) -> throw({bad, What, Off}).

%% walk(Bytes, Offset, Depth, NewAtoms) -> {Rest, Offset, NewAtoms}
walk(_, Off, Depth, _) when Depth > ?MAX_DEPTH ->
    bad(<<"nesting too deep">>, Off);
walk(<<>>, Off, _, _) ->
    bad(<<"truncated term">>, Off);
walk(<<Tag, R/binary>>, Off, D, N) ->
    O = Off + 1,
    case Tag of
        70 -> skip(R, 8, O, N);
        97 -> skip(R, 1, O, N);
        98 -> skip(R, 4, O, N);
        99 -> skip(R, 31, O, N);
        100 -> atom(R, 2, latin1, Off, N);
        115 -> atom(R, 1, latin1, Off, N);
        118 -> atom(R, 2, utf8, Off, N);
        119 -> atom(R, 1, utf8, Off, N);
        106 -> {R, O, N};
        104 -> need(R, 1, O), <<A, R1/binary>> = R, elems(R1, A, O + 1, D, N);
        105 -> need(R, 4, O), <<A:32, R1/binary>> = R, elems(R1, A, O + 4, D, N);
        116 -> need(R, 4, O), <<A:32, R1/binary>> = R, elems(R1, 2 * A, O + 4, D, N);
        108 ->
            need(R, 4, O),
            <<A:32, R1/binary>> = R,
            {R2, O2, N2} = elems(R1, A, O + 4, D, N),
            walk(R2, O2, D + 1, N2);
        107 -> need(R, 2, O), <<L:16, R1/binary>> = R, skip(R1, L, O + 2, N);
        109 -> need(R, 4, O), <<L:32, R1/binary>> = R, skip(R1, L, O + 4, N);
        77 -> need(R, 5, O), <<L:32, _, R1/binary>> = R, skip(R1, L, O + 5, N);
        110 -> need(R, 2, O), <<L, _, R1/binary>> = R, skip(R1, L, O + 2, N);
        111 -> need(R, 5, O), <<L:32, _, R1/binary>> = R, skip(R1, L, O + 5, N);
        88 -> node_then(R, 12, O, D, N);
        103 -> node_then(R, 9, O, D, N);
        89 -> node_then(R, 8, O, D, N);
        120 -> node_then(R, 12, O, D, N);
        102 -> node_then(R, 5, O, D, N);
        101 -> node_then(R, 5, O, D, N);
        90 ->
            need(R, 2, O),
            <<L:16, R1/binary>> = R,
            {R2, O2, N2} = walk(R1, O + 2, D + 1, N),
            skip(R2, 4 + 4 * L, O2, N2);
        114 ->
            need(R, 2, O),
            <<L:16, R1/binary>> = R,
            {R2, O2, N2} = walk(R1, O + 2, D + 1, N),
            skip(R2, 1 + 4 * L, O2, N2);
        113 ->
            {R1, O1, N1} = walk(R, O, D + 1, N + 1),
            {R2, O2, N2} = walk(R1, O1, D + 1, N1),
            walk(R2, O2, D + 1, N2);
        112 ->
            need(R, 4, O),
            <<Size:32, _/binary>> = R,
            skip(R, Size, O, N);
        _ ->
            bad(iolist_to_binary(io_lib:format("unknown tag ~b", [Tag])), Off)
    end.

need(R, Len, O) when byte_size(R) < Len -> bad(<<"truncated term">>, O + byte_size(R));
need(_, _, _) -> ok.

skip(R, Len, O, N) ->
    need(R, Len, O),
    <<_:Len/binary, R1/binary>> = R,
    {R1, O + Len, N}.

atom(R, LenBytes, Enc, Off, N) ->
    O = Off + 1,
    need(R, LenBytes, O),
    <<L:LenBytes/unit:8, R1/binary>> = R,
    need(R1, L, O + LenBytes),
    <<Text:L/binary, R2/binary>> = R1,
    Known =
        try binary_to_existing_atom(Text, Enc) of
            _ -> true
        catch
            error:badarg ->
                case Enc =:= utf8 andalso unicode:characters_to_list(Text, utf8) of
                    L2 when is_list(L2), length(L2) =< 255 -> false;
                    false when L =< 255 -> false;
                    _ -> bad(<<"invalid atom text">>, Off)
                end
        end,
    Seen = get(sshrpc_unknown_atoms),
    Key = case Enc of
              utf8 -> Text;
              latin1 -> unicode:characters_to_binary(Text, latin1, utf8)
          end,
    case Known orelse is_map_key(Key, Seen) of
        true ->
            {R2, O + LenBytes + L, N};
        false ->
            map_size(Seen) > 0 orelse put(sshrpc_first_unknown_atom, {Off, Text}),
            put(sshrpc_unknown_atoms, Seen#{Key => true}),
            {R2, O + LenBytes + L, N + 1}
    end.

elems(R, 0, O, _D, N) -> {R, O, N};
elems(R, K, O, D, N) ->
    {R1, O1, N1} = walk(R, O, D + 1, N),
    elems(R1, K - 1, O1, D, N1).

node_then(R, Len, O, D, N) ->
    {R1, O1, N1} = walk(R, O, D + 1, N),
    skip(R1, Len, O1, N1).
