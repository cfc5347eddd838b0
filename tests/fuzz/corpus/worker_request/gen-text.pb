
req-1Once upon a time*"333?fff?( *

*The end0*=мл▄?