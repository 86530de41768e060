%% Erlang side of the ETF conformance test (tests/integration/test_erlang_conformance.py).
%%
%% Written for and run with Debian's Erlang/OTP 25.2.3 (erts 13.1.5).  OTP 25's
%% default term_to_binary/1 emits Latin-1 atom tags (100) and UTF-8 tags only
%% for atoms outside Latin-1; [{minor_version,2}] gives the UTF-8 atoms that
%% OTP 26+ emits by default, which PROTOCOL.md section 8 calls canonical.
%%
%% One VM does both halves, so the original terms (live pids, ports, refs and
%% funs of this node) stay in memory between them:
%%
%%   1. `main([Dir])` builds the corpus, writes every encoding of every term to
%%      Dir/corpus.bin and prints "READY <count> <OTP version>".
%%   2. It then reads one line "CHECK Label..." from stdin.  For each label,
%%      Python has written Dir/ours_<Label>.bin (its re-encodings of
%%      corpus.bin, in order) and Dir/pyvalues_<Label>.bin (Python values
%%      encoded by sshrpc, with the expected term in Erlang syntax).  The
%%      verdicts go to Dir/results_<Label>.txt; then it prints "DONE" and halts.
%%
%% File formats (all integers big-endian):
%%   corpus.bin      repeated <<NameLen:16, Name, Len:32, Bytes>>
%%   ours_*.bin      repeated <<Status:8, Len:32, Bytes>>, one per corpus entry;
%%                   Status 0: Bytes are Python's encoding; else an error text
%%   pyvalues_*.bin  repeated <<NameLen:16, Name, TextLen:32, Text,
%%                   Canonical:8, Status:8, Len:32, Bytes>>
%%   mutants_*.bin   repeated <<Len:32, Input, Status:8, Len:32, Bytes>>: byte
%%                   strings Python derived from corpus.bin; Status 0: Bytes
%%                   is our re-encoding, 1: we refused it (TermError), else
%%                   Bytes is an error text
%%   results_*.txt   one line per entry: Name Verdict Identical Expected
%%                   (tab-separated).  Verdict is `equal` when
%%                   binary_to_term(Ours) =:= Original and both re-encode to
%%                   the same canonical bytes (which =:= alone cannot tell
%%                   for 0.0 and -0.0 in OTP 25), else `notequal`, `badterm`
%%                   (binary_to_term refused it) or `python:<error>`.
%%                   Identical is `yes` when Ours is exactly the expected
%%                   bytes; Expected says which bytes those are:
%%                   `canonical` (term_to_binary(T, [{minor_version,2}])),
%%                   `verbatim` (the input bytes) or `none` (=:= only).
-module(etf_corpus).
-export([main/1]).

-define(SEED, {exsss, [20261122, 4, 7]}).
-define(RANDOM_TERMS, 400).

main([Dir]) ->
    Live = live_values(),
    Entries = entries(Live),
    ok = file:write_file(filename:join(Dir, "corpus.bin"),
                         [record(Name, Bytes) || {Name, _Term, Bytes, _Expect} <- Entries]),
    io:format("READY ~b ~s~n", [length(Entries), otp_version()]),
    Line = io:get_line(""),
    ["CHECK" | Labels] = string:lexemes(string:trim(Line), " "),
    [check(Dir, Label, Entries) || Label <- Labels],
    catch port_close(maps:get(cat, Live)),
    io:format("DONE~n"),
    halt(0).

otp_version() ->
    File = filename:join([code:root_dir(), "releases", erlang:system_info(otp_release),
                          "OTP_VERSION"]),
    case file:read_file(File) of
        {ok, Version} -> string:trim(Version);
        {error, _} -> erlang:system_info(otp_release)
    end.

record(Name, Bytes) ->
    N = unicode:characters_to_binary(Name),
    [<<(byte_size(N)):16>>, N, <<(byte_size(Bytes)):32>>, Bytes].

%% ---------------------------------------------------------------------------
%% The corpus: {Name, Term, OtpBytes, Expect}.

entries(Live) ->
    Variants = [{"default", []},
                {"compressed", [compressed]},
                {"minor0", [{minor_version, 0}]},
                {"minor1", [{minor_version, 1}]},
                {"minor2", [{minor_version, 2}]}],
    Terms = edge_terms(Live) ++ random_terms(Live),
    Generated =
        [{Name ++ "/" ++ VName, Term, term_to_binary(Term, Opts), expect(VName, Term)}
         || {Name, Term} <- Terms, {VName, Opts} <- Variants],
    Generated ++ [{"hand/" ++ Name, binary_to_term(B), B, Expect}
                  || {Name, B, Expect} <- handmade()].

%% Decoding normalises atoms and floats, so every term without opaque parts
%% re-encodes canonically whatever the input form.  Pids, ports, refs and
%% funs keep their input bytes (with a Latin-1 node atom unless minor2).
expect("minor2", _Term) -> canonical;
expect(_, Term) ->
    case has_opaque(Term) of
        true -> none;
        false -> canonical
    end.

has_opaque(T) when is_pid(T); is_port(T); is_reference(T); is_function(T) -> true;
has_opaque(T) when is_tuple(T) -> has_opaque(tuple_to_list(T));
has_opaque([H | T]) -> has_opaque(H) orelse has_opaque(T);
has_opaque(T) when is_map(T) -> has_opaque(maps:to_list(T));
has_opaque(_) -> false.

edge_terms(Live) ->
    #{pids := Pids, refs := Refs, ports := Ports, funs := Funs} = Live,
    Ints = [0, 1, 255, 256, -1, -255, -256, 2147483647, 2147483648, -2147483648,
            -2147483649, 4294967295, 4294967296, 1 bsl 63, (1 bsl 64) - 1, 1 bsl 64,
            -(1 bsl 64), (1 bsl (8 * 255)) - 1, 1 bsl (8 * 255), -((1 bsl (8 * 255)) - 1),
            -(1 bsl (8 * 255)), (1 bsl (8 * 1024)) - 1, (1 bsl (8 * 8192)) - 1,
            -((1 bsl (8 * 8192)) - 1)],
    <<MinDenormal/float>> = <<1:64>>,
    <<MaxDenormal/float>> = <<16#000FFFFFFFFFFFFF:64>>,
    <<MinNormal/float>> = <<16#0010000000000000:64>>,
    <<MaxFloat/float>> = <<16#7FEFFFFFFFFFFFFF:64>>,
    <<NegZero/float>> = <<16#8000000000000000:64>>,
    Floats = [0.0, NegZero, 1.0, -1.5, 0.1, 1/3, math:pi(), 1.0e100, -1.0e-100,
              MinDenormal, -MinDenormal, MaxDenormal, MinNormal, MaxFloat, -MaxFloat,
              9007199254740993.0, 123456789.0],
    Atoms = ['', a, ok, 'hello world', true, false, undefined, nil, 'Elixir.Foo',
             list_to_atom([255]), list_to_atom([233, 116, 233]), list_to_atom([960]),
             list_to_atom([16#1F600]), list_to_atom(lists:duplicate(255, $a)),
             list_to_atom(lists:duplicate(255, 255)), list_to_atom(lists:duplicate(255, 960)),
             list_to_atom(lists:duplicate(255, 16#1F600))],
    Strings = ["", "a", "hello", lists:seq(0, 255), lists:duplicate(65535, $x),
               lists:duplicate(65536, $y), [256], [1000, 2000], [0, 256, 255],
               [-1, 1], "caf" ++ [233]],
    Bins = [<<>>, <<0>>, <<"hello">>, list_to_binary(lists:seq(0, 255)),
            binary:copy(<<1, 2, 3, 4>>, 25000)],
    Bits = [<<1:1>>, <<0:1>>, <<255, 1:7>>, <<5:3>>, <<"abc", 3:2>>,
            binary:part(binary:copy(<<7>>, 300), 0, 299)],
    Tuples = [{}, {a}, {a, 1, <<"b">>}, list_to_tuple(lists:seq(1, 255)),
              list_to_tuple(lists:seq(1, 256)), list_to_tuple(lists:seq(1, 1000)),
              {{}, {{}}, [{}]}],
    Lists = [[], [[]], [a, [b, [c]]], [1.5, a, <<>>, {}], [1 | 2], [a, b | c],
             [[1 | 2] | 3], [x | #{}], [1, 2 | <<"t">>], [1 | 2.5], [[] | []],
             lists:seq(1, 1000), [I * 1.5 || I <- lists:seq(1, 100)]],
    Maps = [#{}, #{a => 1}, #{1 => a, 1.0 => b, true => c}, #{1 => x, 1.0 => y},
            #{0 => a, 0.0 => b, -0.0 => c, false => d},
            #{[1, 2] => list, #{k => v} => map, {t, [l]} => tuple},
            maps:from_list([{I, I} || I <- lists:seq(1, 32)]),
            maps:from_list([{I, I} || I <- lists:seq(1, 33)]),
            maps:from_list([{list_to_atom("k" ++ integer_to_list(I)), I}
                            || I <- lists:seq(1, 100)]),
            maps:from_list([{K, K} || K <- lists:seq(1, 300) ++
                                           [I * 0.5 || I <- lists:seq(1, 300)] ++
                                           [<<I:16>> || I <- lists:seq(1, 300)]]),
            #{a => #{b => #{c => [#{}]}}}],
    Nested = [nest(list, 1000), nest(tuple, 1000), nest(map, 1000), nest(mixed, 999),
              nest(improper, 500),
              {call, 1, mod, 'fun', [1, <<"x">>]},
              {hello, 1, #{max_frame => 1048576, client => <<"py/1">>}},
              {error, 7, {sshrpc, badarg, #{message => <<"bad">>}}},
              lists:zip(Atoms, lists:seq(1, length(Atoms)))],
    Opaques = Pids ++ Refs ++ Ports ++ Funs ++
        [{Pids, Refs}, #{pid => hd(Pids), ref => hd(Refs), port => hd(Ports)},
         [hd(Funs) | hd(Pids)]],
    Groups = [{"int", Ints}, {"float", Floats}, {"atom", Atoms}, {"string", Strings},
              {"binary", Bins}, {"bitstring", Bits}, {"tuple", Tuples}, {"list", Lists},
              {"map", Maps}, {"nested", Nested}, {"opaque", Opaques}],
    [{G ++ "-" ++ integer_to_list(I), T}
     || {G, Ts} <- Groups, {I, T} <- lists:zip(lists:seq(1, length(Ts)), Ts)].

%% N levels of containers around [], each level one nesting step.
nest(Kind, N) ->
    lists:foldl(fun(I, Acc) ->
                        case Kind of
                            list -> [Acc];
                            tuple -> {Acc};
                            map -> #{k => Acc};
                            improper -> [Acc | I];
                            mixed when I rem 3 =:= 0 -> [Acc, I];
                            mixed when I rem 3 =:= 1 -> {I, Acc};
                            mixed -> #{I => Acc}
                        end
                end, [], lists:seq(1, N)).

%% Pids, refs, ports and funs of this live node, plus external ones of other
%% nodes (made with binary_to_term, as a distribution connection would).
live_values() ->
    Self = self(),
    Spawned = spawn(fun() -> receive stop -> ok end end),
    {ok, Port} = open_port_cat(),
    Y = {captured, [1, 2, 3], <<"env">>},
    Funs = [fun() -> ok end, fun(X) -> {X, Y} end, fun(A, B) -> A + B + length(tuple_to_list(Y)) end,
            fun lists:map/2, fun erlang:'+'/2, fun ?MODULE:main/1,
            eval(<<"fun(Z) -> Z * 2 end">>)],
    Ext = fun(B) -> binary_to_term(B) end,
    Node = <<"other@host.example">>,
    UNode = unicode:characters_to_binary([960, $@, $h]),
    Pids = [Self, Spawned, list_to_pid("<0.0.0>"),
            Ext(<<131, 88, 119, (byte_size(Node)), Node/binary, 16#7FFF:32, 16#1FFF:32,
                  16#FFFFFFFF:32>>),
            Ext(<<131, 88, 119, (byte_size(UNode)), UNode/binary, 1:32, 0:32, 7:32>>)],
    Refs = [make_ref(), alias(), erlang:monitor(process, Spawned),
            Ext(<<131, 90, 0, 3, 119, (byte_size(Node)), Node/binary, 16#FFFFFFFF:32,
                  1:32, 2:32, 3:32>>),
            Ext(<<131, 90, 0, 5, 119, (byte_size(UNode)), UNode/binary, 9:32,
                  1:32, 2:32, 3:32, 4:32, 5:32>>)],
    Ports = [Port | erlang:ports()] ++
        [Ext(<<131, 89, 119, (byte_size(Node)), Node/binary, 77:32, 3:32>>),
         Ext(<<131, 120, 119, (byte_size(Node)), Node/binary, 1:32, 2:32, 3:32>>)],
    #{pids => Pids, refs => Refs, ports => Ports, funs => Funs, cat => Port}.

open_port_cat() ->
    try {ok, open_port({spawn_executable, "/bin/cat"}, [binary])}
    catch _:_ -> {ok, hd(erlang:ports())}
    end.

%% Non-canonical inputs that binary_to_term accepts, with what our bytes
%% must be: the canonical form, the input verbatim (opaques) or only =:=.
handmade() ->
    N = <<"a@b.c">>,
    L = byte_size(N),
    [{"small_atom_ext", <<131, 115, 3, "abc">>, canonical},
     {"atom_ext", <<131, 100, 0, 3, "abc">>, canonical},
     {"atom_ext_latin1", <<131, 100, 0, 2, 233, 255>>, canonical},
     {"atom_ext_true", <<131, 100, 0, 4, "true">>, canonical},
     {"atom_utf8_ext_short", <<131, 118, 0, 3, "abc">>, canonical},
     {"integer_ext_small", <<131, 98, 0, 0, 0, 5>>, canonical},
     {"small_big_fits", <<131, 110, 1, 0, 5>>, canonical},
     {"small_big_leading_zero", <<131, 110, 2, 0, 5, 0>>, canonical},
     {"large_big_small", <<131, 111, 0, 0, 0, 1, 1, 200>>, canonical},
     {"large_tuple_small", <<131, 105, 0, 0, 0, 1, 97, 1>>, canonical},
     {"list_ext_bytes", <<131, 108, 0, 0, 0, 2, 97, 1, 97, 2, 106>>, canonical},
     {"list_tail_list", <<131, 108, 0, 0, 0, 1, 97, 1, 108, 0, 0, 0, 1, 97, 2, 106>>,
      canonical},
     {"list_tail_string", <<131, 108, 0, 0, 0, 1, 97, 1, 107, 0, 1, 2>>, canonical},
     {"list_empty_tail", <<131, 108, 0, 0, 0, 0, 97, 5>>, canonical},
     {"string_ext_empty", <<131, 107, 0, 0>>, canonical},
     {"bit_binary_8", <<131, 77, 0, 0, 0, 1, 8, 5>>, canonical},
     {"bit_binary_dirty", <<131, 77, 0, 0, 0, 1, 3, 255>>, canonical},
     {"float_ext", <<131, 99, "1.50000000000000000000e+00", 0, 0, 0, 0, 0>>, canonical},
     {"map_unsorted", <<131, 116, 0, 0, 0, 2, 97, 2, 97, 0, 97, 1, 97, 0>>, verbatim},
     {"pid_ext", <<131, 103, 100, 0, L, N/binary, 1:32, 2:32, 3>>, verbatim},
     {"new_pid_latin1", <<131, 88, 100, 0, L, N/binary, 1:32, 2:32, 3:32>>, verbatim},
     {"port_ext", <<131, 102, 100, 0, L, N/binary, 1:32, 3>>, verbatim},
     {"new_port_ext", <<131, 89, 119, L, N/binary, 2:32, 7:32>>, verbatim},
     {"v4_port_ext", <<131, 120, 119, L, N/binary, 1:32, 2:32, 7:32>>, verbatim},
     {"reference_ext", <<131, 101, 100, 0, L, N/binary, 1:32, 3>>, verbatim},
     {"new_reference_ext", <<131, 114, 0, 2, 100, 0, L, N/binary, 3, 1:32, 2:32>>, verbatim},
     {"newer_reference_5", <<131, 90, 0, 5, 115, L, N/binary, 7:32, 1:32, 2:32, 3:32, 4:32,
                             5:32>>, verbatim},
     {"compressed_level9",
      <<131, 80, 6:32, (zlib:compress(<<104, 1, 110, 1, 0, 5>>))/binary>>, canonical}].

%% ---------------------------------------------------------------------------
%% Seeded random terms.

random_terms(Live) ->
    rand:seed(element(1, ?SEED), list_to_tuple(element(2, ?SEED))),
    Opaque = lists:append([V || {K, V} <- maps:to_list(Live), K =/= cat]),
    [{"random-" ++ integer_to_list(I), random_term(4, Opaque)}
     || I <- lists:seq(1, ?RANDOM_TERMS)].

random_term(0, Opaque) -> random_leaf(Opaque);
random_term(D, Opaque) ->
    Sub = fun() -> random_term(D - 1, Opaque) end,
    case rand:uniform(12) of
        N when N =< 5 -> random_leaf(Opaque);
        6 -> list_to_tuple(times(rand:uniform(6) - 1, Sub));
        7 -> times(rand:uniform(6) - 1, Sub);
        8 ->
            lists:foldr(fun(E, Acc) -> [E | Acc] end, random_leaf(Opaque),
                        times(rand:uniform(4), Sub));
        9 -> maps:from_list(times(rand:uniform(5) - 1, fun() -> {Sub(), Sub()} end));
        10 ->
            maps:from_list(times(30 + rand:uniform(20),
                                 fun() -> {random_leaf(Opaque), random_leaf(Opaque)} end));
        11 -> times(rand:uniform(20), fun() -> rand:uniform(256) - 1 end);
        12 -> lists:nth(rand:uniform(length(Opaque)), Opaque)
    end.

times(N, F) -> [F() || _ <- lists:seq(1, N)].

random_leaf(Opaque) ->
    case rand:uniform(9) of
        1 -> rand:uniform(256) - 1;
        2 -> rand:uniform(1 bsl 32) - (1 bsl 31) - 1;
        3 ->
            Big = binary:decode_unsigned(rand:bytes(rand:uniform(40)), little),
            case rand:uniform(2) of 1 -> Big; 2 -> -Big end;
        4 -> random_float();
        5 ->
            Chars = [lists:nth(rand:uniform(6), [$a, $Z, $_, 233, 960, 16#1F600])
                     || _ <- lists:seq(1, rand:uniform(12) - 1)],
            list_to_atom(Chars);
        6 -> rand:bytes(rand:uniform(30) - 1);
        7 -> <<(rand:uniform(1 bsl 13)):(rand:uniform(13))>>;
        8 -> lists:nth(rand:uniform(4), [true, false, undefined, []]);
        9 -> lists:nth(rand:uniform(length(Opaque)), Opaque)
    end.

random_float() ->
    <<Bits:64>> = rand:bytes(8),
    try
        <<F/float>> = <<Bits:64>>,
        F
    catch
        error:{badmatch, _} -> rand:uniform() * 1.0e300
    end.

%% ---------------------------------------------------------------------------
%% The check.

check(Dir, Label, Entries) ->
    {ok, Ours} = file:read_file(filename:join(Dir, "ours_" ++ Label ++ ".bin")),
    Lines1 = check_corpus(Entries, Ours, []),
    {ok, Py} = file:read_file(filename:join(Dir, "pyvalues_" ++ Label ++ ".bin")),
    Lines2 = check_pyvalues(Py, []),
    {ok, Mutants} = file:read_file(filename:join(Dir, "mutants_" ++ Label ++ ".bin")),
    Lines3 = check_mutants(Mutants, 1, []),
    ok = file:write_file(filename:join(Dir, "results_" ++ Label ++ ".txt"),
                         Lines1 ++ Lines2 ++ Lines3).

%% Mutated inputs: does OTP agree with us on which are terms, and on the term?
%% Verdicts: `equal` (both accept, same term), `notequal`, `otp_rejects` (we
%% accept what binary_to_term refuses), `we_reject` (the reverse; limits and
%% forms OTP never emits), `both_reject`.
check_mutants(<<>>, _, Acc) -> lists:reverse(Acc);
check_mutants(<<Len:32, In:Len/binary, Status:8, OLen:32, Ours:OLen/binary, More/binary>>, I,
              Acc) ->
    Otp = try {ok, binary_to_term(In)} catch error:badarg -> error end,
    Verdict = case {Status, Otp} of
                  {0, {ok, T}} ->
                      try binary_to_term(Ours) of
                          Back ->
                              Same = Back =:= T andalso
                                  term_to_binary(Back, [{minor_version, 2}]) =:=
                                      term_to_binary(T, [{minor_version, 2}]),
                              case Same of true -> "equal"; false -> "notequal" end
                      catch error:badarg -> "badterm"
                      end;
                  {0, error} -> "otp_rejects";
                  {1, {ok, _}} -> "we_reject";
                  {1, error} -> "both_reject";
                  {_, _} -> python_error(Ours)
              end,
    Line = result_line("mut/" ++ integer_to_list(I), Verdict, false, none),
    check_mutants(More, I + 1, [Line | Acc]).

check_corpus([], <<>>, Acc) -> lists:reverse(Acc);
check_corpus([{Name, Term, In, Expect} | Rest], <<Status:8, Len:32, Bytes:Len/binary, More/binary>>,
             Acc) ->
    Line = case Status of
               0 -> verdict(Name, Term, Bytes, expected_bytes(Expect, Term, In));
               _ -> result_line(Name, python_error(Bytes), false, Expect)
           end,
    check_corpus(Rest, More, [Line | Acc]).

expected_bytes(canonical, Term, _In) -> {canonical, term_to_binary(Term, [{minor_version, 2}])};
expected_bytes(verbatim, _Term, In) -> {verbatim, In};
expected_bytes(none, _Term, _In) -> {none, none}.

verdict(Name, Term, Bytes, {Expect, ExpectedBytes}) ->
    Verdict = try binary_to_term(Bytes) of
                  Back ->
                      Same = Back =:= Term andalso
                          term_to_binary(Back, [{minor_version, 2}]) =:=
                              term_to_binary(Term, [{minor_version, 2}]),
                      case Same of true -> "equal"; false -> "notequal" end
              catch
                  error:badarg -> "badterm"
              end,
    result_line(Name, Verdict, Bytes =:= ExpectedBytes, Expect).

python_error(Text) ->
    "python:" ++ [case C of $\t -> $\s; $\n -> $\s; _ -> C end
                  || C <- unicode:characters_to_list(Text)].

result_line(Name, Verdict, Identical, Expect) ->
    io_lib:format("~ts\t~ts\t~s\t~s~n",
                  [Name, Verdict, case Identical of true -> "yes"; false -> "no" end, Expect]).

check_pyvalues(<<>>, Acc) -> lists:reverse(Acc);
check_pyvalues(<<NL:16, Name:NL/binary, TL:32, Text:TL/binary, Canonical:8, Status:8, Len:32,
                 Bytes:Len/binary, More/binary>>, Acc) ->
    FullName = "py/" ++ unicode:characters_to_list(Name),
    Expected = eval(Text),
    Expect = case Canonical of 1 -> canonical; 0 -> none end,
    Line = case Status of
               0 -> verdict(FullName, Expected, Bytes, expected_bytes(Expect, Expected, Bytes));
               _ -> result_line(FullName, python_error(Bytes), false, Expect)
           end,
    check_pyvalues(More, [Line | Acc]).

eval(Text) ->
    {ok, Tokens, _} = erl_scan:string(unicode:characters_to_list(Text) ++ "."),
    {ok, Exprs} = erl_parse:parse_exprs(Tokens),
    {value, Value, _} = erl_eval:exprs(Exprs, []),
    Value.
